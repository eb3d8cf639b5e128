//! [`StreamFilters`]: one request's pass through a pipeline. Request-side
//! callbacks run in pipeline order, response-side in reverse; PAUSE on
//! headers waits for `proxy_continue_stream` (typically from an `http_call`
//! answer); PAUSE on a body buffers (up to `max_body_bytes`) and calls the
//! same filter again with the cumulative body; a local response, a closed
//! stream or a failure under `fail = "closed"` ends the chain with a
//! response.
//!
//! Runs on the worker that accepted the request. The value holds only ids,
//! `Arc`s and the stream's own data (moved into the VM for one synchronous
//! callback and back), so the request future stays `Send`; no VM is
//! borrowed across an await. Callouts a filter starts are spawned on the
//! current runtime and their answers come back through this stream's own
//! channel.
//!
//! Not supported (documented limits): resuming a paused *body* from an
//! `http_call` answer (the body keeps buffering until end of stream; a
//! filter that pauses at the end of a body with a callout pending fails by
//! its policy instead of seeing its body forwarded unapproved), and PAUSE on
//! trailers (treated as CONTINUE).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::abi::properties::stream_property;
use super::host::{map_usage, Dir, LocalResponse, ReqHead, RespHead, StreamData};
use super::set::FilterSet;
use super::vm::{Callback, Failure};
use super::worker::{self, spawn_callout, CalloutDone, Deliver, InstanceRef};
use super::{BodyVerdict, FailPolicy, StreamInfo, Verdict};
use crate::errors::ErrorCode;

/// One filter of the pipeline, for this stream.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Index of the filter in the set.
    idx: usize,
    /// Context id in the instance (0 = not created yet).
    ctx: u32,
    /// The leased instance (0 = none leased yet).
    incarnation: u64,
    /// Failed under `fail = "open"`: skipped for the rest of the stream.
    skipped: bool,
    /// This filter's `http_call`s not answered yet.
    pending: u32,
}

/// What one callback means for the chain.
enum Step {
    Go {
        pause: bool,
        resume_request: bool,
        resume_response: bool,
    },
    Respond(Response<Bytes>),
}

const GO: Step = Step::Go {
    pause: false,
    resume_request: false,
    resume_response: false,
};

/// Per-request filter state.
pub struct StreamFilters {
    set: Arc<FilterSet>,
    slots: Vec<Slot>,
    data: Option<Box<StreamData>>,
    events: Option<(UnboundedSender<CalloutDone>, UnboundedReceiver<CalloutDone>)>,
    pending: usize,
    held_request: Option<(usize, BytesMut)>,
    held_response: Option<(usize, BytesMut)>,
    /// The request / response head came with `end_of_stream`: no body
    /// follows, so the empty end-of-stream "body" the core may still pass
    /// is not shown to filters (as in Envoy, no body callback runs).
    no_body: [bool; 2],
    finished: bool,
}

impl std::fmt::Debug for StreamFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamFilters")
            .field("set", &self.set.id)
            .field("filters", &self.slots.len())
            .finish_non_exhaustive()
    }
}

fn failure_response(name: &str, why: &Failure) -> Response<Bytes> {
    ErrorCode::FilterFailed.response(&format!("filter \"{name}\" failed: {why}"))
}

fn local_response(l: LocalResponse) -> Response<Bytes> {
    let status = u16::try_from(l.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(l.body);
    *r.status_mut() = status;
    for (k, v) in l.headers {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            r.headers_mut().append(n, v);
        }
    }
    if !l.details.is_empty() {
        tracing::debug!(details = l.details, "filter sent a local response");
    }
    r
}

fn order(dir: Dir, n: usize, k: usize) -> usize {
    match dir {
        Dir::Request => k,
        Dir::Response => n - 1 - k,
    }
}

impl StreamFilters {
    pub(crate) fn new(set: Arc<FilterSet>, idx: Vec<usize>, info: StreamInfo) -> Self {
        let data = (!idx.is_empty()).then(|| Box::new(StreamData::new(info)));
        StreamFilters {
            set,
            slots: idx
                .into_iter()
                .map(|idx| Slot {
                    idx,
                    ctx: 0,
                    incarnation: 0,
                    skipped: false,
                    pending: 0,
                })
                .collect(),
            data,
            events: None,
            pending: 0,
            held_request: None,
            held_response: None,
            no_body: [false; 2],
            finished: false,
        }
    }

    /// No filters: every method is a no-op.
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

    fn policy(&self, pos: usize) -> FailPolicy {
        self.slots
            .get(pos)
            .and_then(|s| self.set.plugins.get(s.idx))
            .map(|p| p.fail_policy())
            .unwrap_or_default()
    }

    fn max_body(&self, pos: usize) -> u64 {
        self.slots
            .get(pos)
            .and_then(|s| self.set.plugins.get(s.idx))
            .map(|p| p.spec.max_body_bytes)
            .unwrap_or(u64::MAX)
    }

    /// Applies the failure policy of filter `pos`.
    fn fail(&mut self, pos: usize, why: &Failure) -> Step {
        let name = self.name(pos);
        match self.policy(pos) {
            FailPolicy::Closed => {
                tracing::debug!(filter = %name, error = %why, "filter failed; answering 503 (fail = closed)");
                Step::Respond(failure_response(&name, why))
            }
            FailPolicy::Open => {
                tracing::debug!(filter = %name, error = %why, "filter failed; skipping it (fail = open)");
                if let Some(s) = self.slots.get_mut(pos) {
                    s.skipped = true;
                }
                GO
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

    /// Leases filter `pos`'s instance before its first callback, waiting
    /// (bounded) for one being built. On failure the policy applies.
    async fn lease(&mut self, pos: usize) -> Option<Step> {
        let slot = self.slots.get(pos).copied()?;
        if slot.skipped || slot.incarnation != 0 {
            return None;
        }
        match worker::lease(&self.set, slot.idx).await {
            Ok(inc) => {
                if let Some(s) = self.slots.get_mut(pos) {
                    s.incarnation = inc;
                }
                None
            }
            Err(f) => Some(self.fail(pos, &f)),
        }
    }

    /// Runs one callback of filter `pos` synchronously on its own instance.
    fn run_one(&mut self, pos: usize, cb: Callback) -> Step {
        let Some(slot) = self.slots.get(pos).copied() else {
            return GO;
        };
        if slot.skipped {
            return GO;
        }
        if self.data.is_none() {
            return self.fail(pos, &Failure::ContextLost);
        }
        if slot.incarnation == 0 {
            // Not leased in a header phase (which can wait): take what is ready.
            match worker::lease_now(&self.set, slot.idx) {
                Ok(inc) => {
                    if let Some(s) = self.slots.get_mut(pos) {
                        s.incarnation = inc;
                    }
                }
                Err(f) => return self.fail(pos, &f),
            }
        }
        let Some(at) = self.instance(pos) else {
            return GO;
        };
        let data = &mut self.data;
        let r = worker::with_instance(at, |vm| {
            let ctx = if slot.ctx == 0 {
                vm.create_context()?
            } else {
                slot.ctx
            };
            // A failed callback discards this instance, and only it.
            let out = vm.run(ctx, data, cb)?;
            Ok((ctx, out))
        });
        let (ctx, out) = match r {
            Ok(v) => v,
            Err(f) => return self.fail(pos, &f),
        };
        if let Some(s) = self.slots.get_mut(pos) {
            s.ctx = ctx;
        }
        for c in out.callouts {
            if c.context == ctx {
                let tx = &self.events.get_or_insert_with(unbounded_channel).0;
                self.pending += 1;
                if let Some(s) = self.slots.get_mut(pos) {
                    s.pending += 1;
                }
                let mut c = c;
                // Tag the answer with the pipeline position.
                c.context = pos as u32;
                spawn_callout(c, Deliver::Stream(tx.clone(), Some(at)));
            } else {
                spawn_callout(c, Deliver::Instance(at));
            }
        }
        if let Some(l) = out.actions.local {
            return Step::Respond(local_response(l));
        }
        if out.actions.close {
            return Step::Respond(
                ErrorCode::FilterClosedStream
                    .response(&format!("filter \"{}\" closed the stream", self.name(pos))),
            );
        }
        Step::Go {
            pause: out.pause,
            resume_request: out.actions.continue_request,
            resume_response: out.actions.continue_response,
        }
    }

    /// Delivers one callout answer to the filter that asked for it.
    fn deliver(&mut self, done: CalloutDone) -> (usize, Step) {
        let pos = done.context as usize;
        if let Some(s) = self.slots.get_mut(pos) {
            s.pending = s.pending.saturating_sub(1);
        }
        let (token, answer) = done.into_answer();
        (
            pos,
            self.run_one(pos, Callback::HttpCallResponse { token, answer }),
        )
    }

    /// Delivers answers that arrived while no phase was waiting.
    fn drain_events(&mut self) -> Option<Response<Bytes>> {
        loop {
            let done = self.events.as_mut()?.1.try_recv().ok()?;
            self.pending = self.pending.saturating_sub(1);
            if let (_, Step::Respond(r)) = self.deliver(done) {
                return Some(r);
            }
        }
    }

    /// Waits until filter `pos` resumes `dir`, answers locally, or fails.
    async fn wait_resume(&mut self, pos: usize, dir: Dir) -> Result<(), Response<Bytes>> {
        loop {
            if self.pending == 0 {
                return match self.fail(pos, &Failure::Stuck) {
                    Step::Respond(r) => Err(r),
                    Step::Go { .. } => Ok(()),
                };
            }
            let Some((_, rx)) = self.events.as_mut() else {
                return Ok(());
            };
            let Some(done) = rx.recv().await else {
                return Ok(());
            };
            self.pending = self.pending.saturating_sub(1);
            let (from, step) = self.deliver(done);
            match step {
                Step::Respond(r) => return Err(r),
                Step::Go {
                    resume_request,
                    resume_response,
                    ..
                } => {
                    let resumed = match dir {
                        Dir::Request => resume_request,
                        Dir::Response => resume_response,
                    };
                    if (from == pos && resumed) || self.slots.get(pos).is_some_and(|s| s.skipped) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn header_count(&self, dir: Dir) -> u32 {
        let d = self.data.as_deref();
        let n = match dir {
            Dir::Request => d.and_then(|d| d.req.as_ref()).map(|r| r.headers.len() + 4),
            Dir::Response => d.and_then(|d| d.resp.as_ref()).map(|r| r.headers.len() + 1),
        };
        n.unwrap_or(0) as u32
    }

    async fn headers_chain(&mut self, dir: Dir, eos: bool) -> Verdict {
        self.no_body[dir as usize] = eos;
        if let Some(r) = self.drain_events() {
            return Verdict::Respond(r);
        }
        let n = self.slots.len();
        for k in 0..n {
            let pos = order(dir, n, k);
            if let Some(Step::Respond(r)) = self.lease(pos).await {
                return Verdict::Respond(r);
            }
            let count = self.header_count(dir);
            let cb = match dir {
                Dir::Request => Callback::RequestHeaders { n: count, eos },
                Dir::Response => Callback::ResponseHeaders { n: count, eos },
            };
            match self.run_one(pos, cb) {
                Step::Respond(r) => return Verdict::Respond(r),
                Step::Go {
                    pause,
                    resume_request,
                    resume_response,
                } => {
                    let resumed = match dir {
                        Dir::Request => resume_request,
                        Dir::Response => resume_response,
                    };
                    if pause && !resumed {
                        if let Err(r) = self.wait_resume(pos, dir).await {
                            return Verdict::Respond(r);
                        }
                    }
                }
            }
        }
        Verdict::Continue
    }

    /// Request headers through the chain, in pipeline order. Waits while a
    /// filter is paused. What filters wrote is written back into `head`.
    pub async fn request_headers(
        &mut self,
        head: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        if self.slots.is_empty() {
            return Verdict::Continue;
        }
        if let Some(d) = self.data.as_deref_mut() {
            d.received[0] = map_usage(&head.headers);
            d.req = Some(ReqHead {
                method: head.method.clone(),
                uri: head.uri.clone(),
                headers: std::mem::take(&mut head.headers),
            });
        }
        let v = self.headers_chain(Dir::Request, end_of_stream).await;
        match self.data.as_deref().and_then(|d| d.req.as_ref()) {
            Some(req) => {
                head.method = req.method.clone();
                head.uri = req.uri.clone();
                head.headers = req.headers.clone();
            }
            None => tracing::warn!("request head lost in the filter chain"),
        }
        v
    }

    /// Response headers through the chain, in reverse pipeline order.
    pub async fn response_headers(
        &mut self,
        head: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        if self.slots.is_empty() {
            return Verdict::Continue;
        }
        if let Some(d) = self.data.as_deref_mut() {
            d.received[1] = map_usage(&head.headers);
            d.resp = Some(RespHead {
                status: head.status,
                headers: std::mem::take(&mut head.headers),
            });
        }
        let v = self.headers_chain(Dir::Response, end_of_stream).await;
        match self.data.as_deref().and_then(|d| d.resp.as_ref()) {
            Some(resp) => {
                head.status = resp.status;
                head.headers = resp.headers.clone();
            }
            None => tracing::warn!("response head lost in the filter chain"),
        }
        v
    }

    fn body_chain(&mut self, dir: Dir, chunk: Bytes, eos: bool) -> BodyVerdict {
        if let Some(r) = self.drain_events() {
            return BodyVerdict::Respond(r);
        }
        let n = self.slots.len();
        let held = match dir {
            Dir::Request => self.held_request.take(),
            Dir::Response => self.held_response.take(),
        };
        if held.is_none() && chunk.is_empty() && eos && self.no_body[dir as usize] {
            return BodyVerdict::Forward(chunk);
        }
        let (start, mut buf) = match held {
            Some((k, mut b)) => {
                let pos = order(dir, n, k);
                if (b.len() + chunk.len()) as u64 > self.max_body(pos) {
                    return BodyVerdict::Respond(ErrorCode::BodyTooLarge.response(&format!(
                        "body buffered for filter \"{}\" exceeds its limit",
                        self.name(pos)
                    )));
                }
                b.extend_from_slice(&chunk);
                (k, b)
            }
            // No copy when the chunk is not shared.
            None => (0, BytesMut::from(chunk)),
        };
        for k in start..n {
            let pos = order(dir, n, k);
            let size = buf.len() as u32;
            if let Some(d) = self.data.as_deref_mut() {
                d.body = std::mem::take(&mut buf);
                d.body_dir = Some(dir);
            }
            let cb = match dir {
                Dir::Request => Callback::RequestBody { size, eos },
                Dir::Response => Callback::ResponseBody { size, eos },
            };
            let step = self.run_one(pos, cb);
            if let Some(d) = self.data.as_deref_mut() {
                buf = std::mem::take(&mut d.body);
                d.body_dir = None;
            }
            match step {
                Step::Respond(r) => return BodyVerdict::Respond(r),
                Step::Go { pause: true, .. }
                    if eos && self.slots.get(pos).is_some_and(|s| s.pending > 0) =>
                {
                    // Waiting on an http_call at the end of a body cannot be
                    // honoured by the synchronous body path: never forward
                    // the body as if the filter had agreed.
                    match self.fail(pos, &Failure::BodyWait) {
                        Step::Respond(r) => return BodyVerdict::Respond(r),
                        Step::Go { .. } => {}
                    }
                }
                Step::Go { pause: true, .. } if !eos => {
                    if buf.len() as u64 > self.max_body(pos) {
                        return BodyVerdict::Respond(ErrorCode::BodyTooLarge.response(&format!(
                            "body buffered for filter \"{}\" exceeds its limit",
                            self.name(pos)
                        )));
                    }
                    let held = Some((k, buf));
                    match dir {
                        Dir::Request => self.held_request = held,
                        Dir::Response => self.held_response = held,
                    }
                    return BodyVerdict::Hold;
                }
                Step::Go { .. } => {}
            }
        }
        BodyVerdict::Forward(buf.freeze())
    }

    /// A request body chunk through the chain. When a filter pauses, the
    /// engine holds the body (answer `Hold`) and later forwards it whole.
    /// If the request ends with trailers, call this with an empty chunk and
    /// `end_of_stream = true` first so held bytes are released.
    pub fn request_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        if self.slots.is_empty() {
            return BodyVerdict::Forward(chunk);
        }
        self.body_chain(Dir::Request, chunk, end_of_stream)
    }

    /// A response body chunk through the chain (reverse order).
    pub fn response_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        if self.slots.is_empty() {
            return BodyVerdict::Forward(chunk);
        }
        self.body_chain(Dir::Response, chunk, end_of_stream)
    }

    fn trailers_chain(&mut self, dir: Dir, trailers: &mut HeaderMap) -> Verdict {
        if let Some(r) = self.drain_events() {
            return Verdict::Respond(r);
        }
        if let Some(d) = self.data.as_deref_mut() {
            let t = Some(std::mem::take(trailers));
            match dir {
                Dir::Request => d.req_trailers = t,
                Dir::Response => d.resp_trailers = t,
            }
        }
        let n = self.slots.len();
        let mut verdict = Verdict::Continue;
        for k in 0..n {
            let pos = order(dir, n, k);
            let count = trailers_len(self.data.as_deref(), dir);
            let cb = match dir {
                Dir::Request => Callback::RequestTrailers { n: count },
                Dir::Response => Callback::ResponseTrailers { n: count },
            };
            if let Step::Respond(r) = self.run_one(pos, cb) {
                verdict = Verdict::Respond(r);
                break;
            }
        }
        if let Some(d) = self.data.as_deref_mut() {
            let t = match dir {
                Dir::Request => d.req_trailers.clone(),
                Dir::Response => d.resp_trailers.clone(),
            };
            *trailers = t.unwrap_or_default();
        }
        verdict
    }

    /// Request trailers through the chain.
    pub fn request_trailers(&mut self, trailers: &mut HeaderMap) -> Verdict {
        if self.slots.is_empty() {
            return Verdict::Continue;
        }
        self.trailers_chain(Dir::Request, trailers)
    }

    /// Response trailers through the chain (reverse order).
    pub fn response_trailers(&mut self, trailers: &mut HeaderMap) -> Verdict {
        if self.slots.is_empty() {
            return Verdict::Continue;
        }
        self.trailers_chain(Dir::Response, trailers)
    }

    /// Route and cluster picked by the core (`route_name`, `cluster_name`).
    pub fn set_route(&mut self, route: Arc<str>, cluster: Arc<str>) {
        if let Some(d) = self.data.as_deref_mut() {
            d.route = Some(route);
            d.cluster = Some(cluster);
        }
    }

    /// Upstream address picked by the core (`upstream.address`).
    pub fn set_upstream(&mut self, addr: std::net::SocketAddr) {
        if let Some(d) = self.data.as_deref_mut() {
            d.upstream = Some(addr);
        }
    }

    /// A response the proxy made itself instead of forwarding: its
    /// `x-wasp-error` code (`wasp.error`) and its head, so `on_log` sees the
    /// status the client got (`response.code`) even though no response
    /// callback ran.
    pub fn set_local_reply<B>(&mut self, code: &'static str, resp: &http::Response<B>) {
        if let Some(d) = self.data.as_deref_mut() {
            d.error_code = Some(code);
            d.resp = Some(RespHead {
                status: resp.status(),
                headers: resp.headers().clone(),
            });
        }
    }

    /// A stream property by dot-joined path (e.g. `wasp.cluster`), including
    /// values filters set with `proxy_set_property`.
    pub fn property(&self, path: &str) -> Option<Bytes> {
        stream_property(self.data.as_deref()?, path)
    }

    /// Ends the stream: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`
    /// on every VM that saw it (request order).
    pub fn finish(mut self, request_bytes: u64, response_bytes: u64) {
        if let Some(d) = self.data.as_deref_mut() {
            d.sizes = Some((request_bytes, response_bytes));
        }
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
            // A healthy instance goes back to the pool for the next stream.
            let data = &mut self.data;
            let r = worker::finish_lease(at, |vm| {
                if slot.ctx != 0 {
                    if log && !slot.skipped {
                        vm.run(slot.ctx, data, Callback::Log)?;
                    }
                    vm.run(slot.ctx, data, Callback::Done)?;
                    vm.run(slot.ctx, data, Callback::Delete)?;
                }
                Ok(())
            });
            match r {
                Ok(()) | Err(Failure::ContextLost) => {}
                Err(f) => {
                    tracing::debug!(filter = %self.name(pos), error = %f, "filter failed while ending a stream")
                }
            }
        }
    }
}

fn trailers_len(d: Option<&StreamData>, dir: Dir) -> u32 {
    let t = d.and_then(|d| match dir {
        Dir::Request => d.req_trailers.as_ref(),
        Dir::Response => d.resp_trailers.as_ref(),
    });
    t.map(|t| t.len() as u32).unwrap_or(0)
}

impl Drop for StreamFilters {
    fn drop(&mut self) {
        self.release(false);
    }
}
