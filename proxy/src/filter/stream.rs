//! [`StreamFilters`]: one request's pass through a pipeline. Request-side
//! callbacks run in pipeline order, response-side in reverse; PAUSE on
//! headers waits for `proxy_continue_stream` (typically from an `http_call`
//! answer); PAUSE on a body buffers (up to `max_body_bytes`) and calls the
//! same filter again with the cumulative body, each later chunk first
//! passing the filters before it (several filters may hold a buffer at
//! once, one each; data only moves forward); a local response, a closed
//! stream or a failure under `fail = "closed"` ends the chain with a
//! response. An answer the chain makes for wasp (`filter_failed`,
//! `filter_closed_stream`, a body over a filter's buffer) is rendered by
//! [`ErrorCode::response`], which carries its code with it: `forward`
//! counts it where it counts every answer wasp makes; a filter's own local
//! reply is marked [`super::FilterReply`] instead.
//!
//! Runs on the worker that accepted the request. The value holds only ids,
//! `Arc`s and the stream's own data (moved into the VM for one synchronous
//! callback and back), so the request future stays `Send`; no VM is
//! borrowed across an await. Callouts a filter starts are spawned on the
//! current runtime and their answers come back through this stream's own
//! channel.
//!
//! A filter that pauses at the *end* of a body with a callout pending holds
//! the whole body ([`BodyVerdict::Wait`]) until an answer resumes it
//! ([`StreamFilters::poll_body_wait`]; answers delivered by a concurrent
//! header phase settle it too), answers locally, or fails; a pause before
//! the end buffers as usual. Trailers work the same way
//! ([`Verdict::Wait`], [`StreamFilters::poll_trailers_wait`]); a PAUSE on
//! trailers with no callout pending is treated as CONTINUE. Each direction
//! has its own wait and waker: the request and the response body may wait
//! at once. Whoever delivers an answer (a header phase, either body) wakes
//! every parked body, since it took their place as the channel's waiter. A
//! header phase waits at most [`HEADER_WAIT_LIMIT`].

use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use smallvec::SmallVec;
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
    /// Which of the filter's configs this stream's context gets (0: its
    /// own; k: the k-th per-route one).
    variant: u32,
    /// Context id in the instance (0 = not created yet).
    ctx: u32,
    /// The leased instance (0 = none leased yet).
    incarnation: u64,
    /// Failed under `fail = "open"`: skipped for the rest of the stream.
    skipped: bool,
    /// This filter's `http_call`s not answered yet.
    pending: u32,
}

/// A finished body waiting for filter `k` (in its direction's order) to
/// resume it.
struct BodyWait {
    k: usize,
    buf: Bytes,
}

/// One direction's body or trailers waiting for a callout, and what the
/// chain made of them once resumed. Each direction has its own: a filter
/// may wait at the end of the request body and again at the end of the
/// response body, and each body task parks its own waker.
#[derive(Default)]
struct Waits {
    body: Option<BodyWait>,
    body_done: Option<BodyVerdict>,
    /// Trailers held while filter `k` waits.
    trailers: Option<usize>,
    trailers_done: Option<Verdict>,
    /// The body task parked in [`StreamFilters::poll_body_wait`] /
    /// [`StreamFilters::poll_trailers_wait`] of this direction.
    waker: Option<std::task::Waker>,
    /// When the current wait must be over ([`HEADER_WAIT_LIMIT`] after it
    /// began), and its timer once the wait is polled: a callout without a
    /// deadline of its own (a gRPC stream) cannot hold a body forever.
    until: Option<tokio::time::Instant>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Waits {
    /// The filter (in the direction's order) a held body or trailers wait on.
    fn waited(&self) -> Option<usize> {
        self.body.as_ref().map(|w| w.k).or(self.trailers)
    }
}

fn side(dir: Dir) -> usize {
    match dir {
        Dir::Request => 0,
        Dir::Response => 1,
    }
}

/// The answer to a body a filter buffered past its limit: the client's
/// request is too large (413); a response too large to buffer is the
/// proxy's failure, not the client's (500, as Envoy's
/// `response_payload_too_large`).
fn too_large(dir: Dir) -> ErrorCode {
    match dir {
        Dir::Request => ErrorCode::BodyTooLarge,
        Dir::Response => ErrorCode::ResponseTooLarge,
    }
}

/// Longest a header phase waits for a paused filter to resume it; past it
/// the filter is stuck (its `fail` policy applies). As Envoy's default
/// `stream_idle_timeout`: a callout without a deadline of its own (a gRPC
/// stream) cannot hold a request forever.
pub(crate) const HEADER_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// What one callback means for the chain. The response is boxed: a step
/// is returned from every callback, and answering is the rare case.
enum Step {
    Go {
        pause: bool,
        resume_request: bool,
        resume_response: bool,
    },
    Respond(Box<Response<Bytes>>),
}

const GO: Step = Step::Go {
    pause: false,
    resume_request: false,
    resume_response: false,
};

/// What leasing a filter's instance for a header phase came to.
enum Leased {
    /// Leased (or nothing to lease: already held, or the filter skipped).
    Ready,
    /// None ready: one is being built (`asked`: this stream asked for it).
    Wait { asked: bool },
    /// No instance to be had, and the filter's policy answers.
    Respond(Box<Response<Bytes>>),
}

/// Where a header phase stopped to wait, for the part of it that awaits
/// ([`StreamFilters::request_headers_later`],
/// [`StreamFilters::response_headers_later`]).
#[derive(Debug)]
pub struct HeaderWait {
    dir: Dir,
    eos: bool,
    /// The filter (in `dir`'s order) the phase waits on.
    k: usize,
    /// `Some(asked)`: for its instance to be built (`asked`: this stream
    /// already asked for a build); `None`: it paused, for it to resume.
    lease: Option<bool>,
}

/// Slots kept inline: a chain of up to this many filters allocates none
/// for them.
const INLINE_SLOTS: usize = 4;

/// Per-request filter state.
pub struct StreamFilters {
    set: Arc<FilterSet>,
    slots: SmallVec<[Slot; INLINE_SLOTS]>,
    data: Option<Box<StreamData>>,
    events: Option<(UnboundedSender<CalloutDone>, UnboundedReceiver<CalloutDone>)>,
    /// Bodies filters paused on to buffer ("stop iteration and buffer"),
    /// per direction (request, response), by position in that direction's
    /// order. Empty until a filter first pauses on a body, so a stream
    /// where none does allocates nothing per chunk. Every chunk still runs
    /// through the positions before a held one (as Envoy: a buffering
    /// filter does not hide later chunks from the filters before it);
    /// reaching a held position it joins that buffer and the filter is
    /// called with all of it. Data only moves forward, so a buffer only
    /// ever holds bytes newer than any buffer at a later position.
    held: [Vec<Option<BytesMut>>; 2],
    /// Bodies and trailers waiting for a callout: request, response.
    waits: [Waits; 2],
    /// How long a header phase waits for a paused filter.
    header_wait_limit: std::time::Duration,
    /// The request / response head came with `end_of_stream`: no body
    /// follows, so the empty end-of-stream "body" the core may still pass
    /// is not shown to filters (as in Envoy, no body callback runs).
    no_body: [bool; 2],
    /// Pipeline positions (bit `pos`, the last bit for 63 and up) of the
    /// filters whose body callback changed a body's length, per direction:
    /// named when a head already went with a `content-length` that the
    /// body then no longer matches ([`Self::report_misframed`]).
    resized: [u64; 2],
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
    // As Envoy's local replies: a body without a type is plain text.
    if !r.body().is_empty() && !r.headers().contains_key(http::header::CONTENT_TYPE) {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    if !l.details.is_empty() {
        tracing::debug!(details = l.details, "filter sent a local response");
    }
    r.extensions_mut().insert(super::FilterReply);
    r
}

/// A second copy of a local response (one for the phase that delivered the
/// answer, one for the body that waited on it).
fn copy_response(r: &Response<Bytes>) -> Response<Bytes> {
    let mut c = Response::new(r.body().clone());
    *c.status_mut() = r.status();
    *c.headers_mut() = r.headers().clone();
    *c.extensions_mut() = r.extensions().clone();
    c
}

fn order(dir: Dir, n: usize, k: usize) -> usize {
    match dir {
        Dir::Request => k,
        Dir::Response => n - 1 - k,
    }
}

impl StreamFilters {
    /// A stream through filters `idx` of `set`, each with the config
    /// variant its context is created under. The stream's one allocation
    /// is its [`StreamData`] (none for an empty chain): the slots are
    /// inline up to [`INLINE_SLOTS`].
    pub(crate) fn new(
        set: Arc<FilterSet>,
        idx: impl IntoIterator<Item = (usize, u32)>,
        info: StreamInfo,
    ) -> Self {
        let slots: SmallVec<[Slot; INLINE_SLOTS]> = idx
            .into_iter()
            .map(|(idx, variant)| Slot {
                idx,
                variant,
                ctx: 0,
                incarnation: 0,
                skipped: false,
                pending: 0,
            })
            .collect();
        let data = (!slots.is_empty()).then(|| Box::new(StreamData::new(info)));
        StreamFilters {
            set,
            slots,
            data,
            events: None,
            held: Default::default(),
            waits: Default::default(),
            header_wait_limit: HEADER_WAIT_LIMIT,
            no_body: [false; 2],
            resized: [0; 2],
            finished: false,
        }
    }

    /// Shortens [`HEADER_WAIT_LIMIT`] (tests).
    #[cfg(test)]
    pub(crate) fn set_header_wait_limit(&mut self, limit: std::time::Duration) {
        self.header_wait_limit = limit;
    }

    /// Callouts of filter `pos` still to answer (only they can resume it).
    fn pending_of(&self, pos: usize) -> u32 {
        self.slots.get(pos).map_or(0, |s| s.pending)
    }

    /// Wakes the body tasks parked on a wait: whoever delivered an answer
    /// (a header phase, or the other direction's body) may have taken their
    /// place as the channel's waiter, so each looks again for itself.
    fn wake_waiters(&mut self) {
        for w in &mut self.waits {
            if let Some(w) = w.waker.take() {
                w.wake();
            }
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
                Step::Respond(Box::new(failure_response(&name, why)))
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

    /// Leases filter `pos`'s instance before its first callback if one is
    /// ready now (the common case: an idle instance in the pool). On
    /// failure the policy applies.
    fn try_lease(&mut self, pos: usize) -> Leased {
        let Some(slot) = self.slots.get(pos).copied() else {
            return Leased::Ready;
        };
        if slot.skipped || slot.incarnation != 0 {
            return Leased::Ready;
        }
        let mut asked = false;
        match worker::try_lease(&self.set, slot.idx, &mut asked) {
            Ok(Some(inc)) => {
                if let Some(s) = self.slots.get_mut(pos) {
                    s.incarnation = inc;
                }
                Leased::Ready
            }
            Ok(None) => Leased::Wait { asked },
            Err(f) => match self.fail(pos, &f) {
                Step::Respond(r) => Leased::Respond(r),
                Step::Go { .. } => Leased::Ready,
            },
        }
    }

    /// After [`Self::try_lease`] found none ready: waits (bounded) for an
    /// instance being built. `asked`: that attempt already asked for a
    /// build. On failure the policy applies.
    async fn lease_wait(&mut self, pos: usize, asked: bool) -> Option<Step> {
        let slot = self.slots.get(pos).copied()?;
        if slot.skipped || slot.incarnation != 0 {
            return None;
        }
        match worker::lease_wait(&self.set, slot.idx, asked).await {
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
        // Not leased in a header phase (which can wait): take what is ready.
        let (mut incarnation, mut ctx) = (slot.incarnation, slot.ctx);
        let r = worker::run_held_as(
            &self.set,
            slot.idx,
            slot.variant,
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
            if c.context == ctx {
                let tx = &self.events.get_or_insert_with(unbounded_channel).0;
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
            return Step::Respond(Box::new(local_response(*l)));
        }
        if out.actions.close {
            return Step::Respond(Box::new(
                ErrorCode::FilterClosedStream
                    .response(&format!("filter \"{}\" closed the stream", self.name(pos))),
            ));
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
        if done.last() {
            if let Some(s) = self.slots.get_mut(pos) {
                s.pending = s.pending.saturating_sub(1);
            }
        }
        let step = self.run_one(pos, done.into_callback());
        self.settle_wait(pos, &step);
        self.wake_waiters();
        (pos, step)
    }

    /// Delivers answers that arrived while no phase was waiting.
    fn drain_events(&mut self) -> Option<Response<Bytes>> {
        loop {
            let done = self.events.as_mut()?.1.try_recv().ok()?;
            if let (_, Step::Respond(r)) = self.deliver(done) {
                return Some(*r);
            }
        }
    }

    /// Waits until filter `pos` resumes `dir`, answers locally, or fails
    /// (nothing of its own left that could resume it, or
    /// `header_wait_limit` passed).
    async fn wait_resume(&mut self, pos: usize, dir: Dir) -> Result<(), Response<Bytes>> {
        let deadline = tokio::time::Instant::now() + self.header_wait_limit;
        loop {
            if self.pending_of(pos) == 0 {
                return match self.fail(pos, &Failure::Stuck) {
                    Step::Respond(r) => Err(*r),
                    Step::Go { .. } => Ok(()),
                };
            }
            let Some((_, rx)) = self.events.as_mut() else {
                return Ok(());
            };
            let done = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(done)) => done,
                Ok(None) => return Ok(()),
                Err(_) => {
                    tracing::debug!(filter = %self.name(pos), "filter paused past the header wait limit");
                    return match self.fail(pos, &Failure::Stuck) {
                        Step::Respond(r) => Err(*r),
                        Step::Go { .. } => Ok(()),
                    };
                }
            };
            let (from, step) = self.deliver(done);
            match step {
                Step::Respond(r) => return Err(*r),
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

    /// Runs the header callbacks of filters `start..` (in `dir`'s order)
    /// for as long as none has to wait: `Wait` says where the phase
    /// stopped, for [`Self::headers_resume`].
    fn headers_from(&mut self, dir: Dir, eos: bool, start: usize) -> Result<Verdict, HeaderWait> {
        let n = self.slots.len();
        for k in start..n {
            let pos = order(dir, n, k);
            match self.try_lease(pos) {
                Leased::Ready => {}
                Leased::Respond(r) => return Ok(Verdict::Respond(*r)),
                Leased::Wait { asked } => {
                    return Err(HeaderWait {
                        dir,
                        eos,
                        k,
                        lease: Some(asked),
                    })
                }
            }
            let count = self.header_count(dir);
            let cb = match dir {
                Dir::Request => Callback::RequestHeaders { n: count, eos },
                Dir::Response => Callback::ResponseHeaders { n: count, eos },
            };
            match self.run_one(pos, cb) {
                Step::Respond(r) => return Ok(Verdict::Respond(*r)),
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
                        return Err(HeaderWait {
                            dir,
                            eos,
                            k,
                            lease: None,
                        });
                    }
                }
            }
        }
        Ok(Verdict::Continue)
    }

    /// The rest of a header phase that had to wait: for the instance of
    /// the filter it stopped at, or for that filter (paused) to resume.
    async fn headers_resume(&mut self, mut w: HeaderWait) -> Verdict {
        loop {
            let pos = order(w.dir, self.slots.len(), w.k);
            let next = match w.lease {
                Some(asked) => {
                    if let Some(Step::Respond(r)) = self.lease_wait(pos, asked).await {
                        return Verdict::Respond(*r);
                    }
                    // Leased (or skipped): its callback is still to run.
                    w.k
                }
                None => {
                    if let Err(r) = self.wait_resume(pos, w.dir).await {
                        return Verdict::Respond(r);
                    }
                    w.k.saturating_add(1)
                }
            };
            match self.headers_from(w.dir, w.eos, next) {
                Ok(v) => return v,
                Err(again) => w = again,
            }
        }
    }

    /// A header phase up to its first wait; `Err` is where it stopped.
    fn headers_now(&mut self, dir: Dir, eos: bool) -> Result<Verdict, HeaderWait> {
        self.no_body[dir as usize] = eos;
        if let Some(r) = self.drain_events() {
            return Ok(Verdict::Respond(r));
        }
        self.headers_from(dir, eos, 0)
    }

    /// Request headers through the chain, in pipeline order. Waits while a
    /// filter is paused. What filters wrote is written back into `head`.
    pub async fn request_headers(
        &mut self,
        head: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        match self.request_headers_now(head, end_of_stream) {
            Ok(v) => v,
            Err(w) => self.request_headers_later(head, w).await,
        }
    }

    /// [`Self::request_headers`] without awaiting: `Err` when a filter has
    /// to wait (for an instance being built, or paused); the phase then
    /// goes on with [`Self::request_headers_later`], and `head` has no
    /// headers until it ends. Most phases never wait, so the caller can
    /// keep the future of the rest off its common path.
    pub fn request_headers_now(
        &mut self,
        head: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Result<Verdict, HeaderWait> {
        if self.slots.is_empty() {
            return Ok(Verdict::Continue);
        }
        if let Some(d) = self.data.as_deref_mut() {
            d.received[0] = map_usage(&head.headers);
            d.usage[0] = d.received[0];
            // Moved in, copied back once the phase is over.
            d.req = Some(ReqHead {
                method: std::mem::take(&mut head.method),
                uri: std::mem::take(&mut head.uri),
                headers: std::mem::take(&mut head.headers),
            });
        }
        let v = self.headers_now(Dir::Request, end_of_stream)?;
        Ok(self.request_headers_done(head, v))
    }

    /// The rest of a request header phase [`Self::request_headers_now`]
    /// could not finish.
    pub async fn request_headers_later(
        &mut self,
        head: &mut http::request::Parts,
        w: HeaderWait,
    ) -> Verdict {
        let v = self.headers_resume(w).await;
        self.request_headers_done(head, v)
    }

    fn request_headers_done(&mut self, head: &mut http::request::Parts, v: Verdict) -> Verdict {
        // Its waits on the callout channel took a waiting body's place.
        self.wake_waiters();
        if let Some(d) = self.data.as_deref_mut() {
            d.heads_sent[0] = true;
        }
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
        match self.response_headers_now(head, end_of_stream) {
            Ok(v) => v,
            Err(w) => self.response_headers_later(head, w).await,
        }
    }

    /// [`Self::response_headers`] without awaiting, as
    /// [`Self::request_headers_now`].
    pub fn response_headers_now(
        &mut self,
        head: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Result<Verdict, HeaderWait> {
        if self.slots.is_empty() {
            return Ok(Verdict::Continue);
        }
        if let Some(d) = self.data.as_deref_mut() {
            d.received[1] = map_usage(&head.headers);
            d.usage[1] = d.received[1];
            d.resp = Some(RespHead {
                status: head.status,
                headers: std::mem::take(&mut head.headers),
            });
        }
        let v = self.headers_now(Dir::Response, end_of_stream)?;
        Ok(self.response_headers_done(head, v))
    }

    /// The rest of a response header phase
    /// [`Self::response_headers_now`] could not finish.
    pub async fn response_headers_later(
        &mut self,
        head: &mut http::response::Parts,
        w: HeaderWait,
    ) -> Verdict {
        let v = self.headers_resume(w).await;
        self.response_headers_done(head, v)
    }

    fn response_headers_done(&mut self, head: &mut http::response::Parts, v: Verdict) -> Verdict {
        self.wake_waiters();
        if let Some(d) = self.data.as_deref_mut() {
            d.heads_sent[1] = true;
        }
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
        let d = side(dir);
        if chunk.is_empty() && eos && self.no_body[d] && self.held[d].iter().all(Option::is_none) {
            return BodyVerdict::Forward(chunk);
        }
        // Passed as it came: a filter that only reads it (or ignores it)
        // costs no copy of a shared buffer.
        self.body_from(dir, 0, chunk, eos)
    }

    /// The answer to a body buffered for filter `pos` past its limit.
    fn over_limit(&self, dir: Dir, pos: usize) -> BodyVerdict {
        BodyVerdict::Respond(too_large(dir).response(&format!(
            "body buffered for filter \"{}\" exceeds its limit",
            self.name(pos)
        )))
    }

    /// Runs the body callbacks of filters `start..` (in `dir`'s order) on
    /// `buf`. At a position that holds a buffer, `buf` is appended to it
    /// and the filter sees the whole of it.
    fn body_from(&mut self, dir: Dir, start: usize, mut buf: Bytes, eos: bool) -> BodyVerdict {
        let n = self.slots.len();
        let d = side(dir);
        for k in start..n {
            let pos = order(dir, n, k);
            if let Some(mut held) = self.held[d].get_mut(k).and_then(Option::take) {
                let total = (held.len() as u64).saturating_add(buf.len() as u64);
                if total > self.max_body(pos) {
                    return self.over_limit(dir, pos);
                }
                if !held.is_empty() {
                    held.extend_from_slice(&buf);
                    buf = held.freeze();
                }
            }
            let before = buf.len();
            let size = u32::try_from(before).unwrap_or(u32::MAX);
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
            if buf.len() != before {
                self.resized[side(dir)] |= 1u64 << pos.min(63);
            }
            match step {
                Step::Respond(r) => return BodyVerdict::Respond(*r),
                Step::Go {
                    pause: true,
                    resume_request,
                    resume_response,
                } if eos && self.slots.get(pos).is_some_and(|s| s.pending > 0) => {
                    let resumed = match dir {
                        Dir::Request => resume_request,
                        Dir::Response => resume_response,
                    };
                    if !resumed {
                        // Waiting on a callout at the end of a body: the
                        // whole body stays here until the filter resumes
                        // (`poll_body_wait`), answers, or fails. It may
                        // wait minutes: keep an owned copy, not a slice
                        // that pins the connection's whole read buffer
                        // (copies only when the buffer is shared).
                        let buf = BytesMut::from(buf).freeze();
                        self.waits[side(dir)].body = Some(BodyWait { k, buf });
                        self.start_wait(dir);
                        return BodyVerdict::Wait;
                    }
                }
                Step::Go { pause: true, .. } if !eos => {
                    if buf.len() as u64 > self.max_body(pos) {
                        return self.over_limit(dir, pos);
                    }
                    // Sized once per stream and direction, at the first pause.
                    let held = &mut self.held[d];
                    if held.len() < n {
                        held.resize_with(n, || None);
                    }
                    if let Some(h) = held.get_mut(k) {
                        // Buffered from here on: owned (a copy only when
                        // the bytes are shared, e.g. a slice of hyper's
                        // read buffer, which must not stay pinned).
                        *h = Some(BytesMut::from(buf));
                        return BodyVerdict::Hold;
                    }
                    // Unreachable (`k < n`): pass the body on rather than lose it.
                }
                Step::Go { .. } => {}
            }
        }
        BodyVerdict::Forward(buf)
    }

    /// A body or trailers wait of `dir` (for a new filter) begins: its
    /// deadline is [`HEADER_WAIT_LIMIT`] from now.
    fn start_wait(&mut self, dir: Dir) {
        let w = &mut self.waits[side(dir)];
        w.until = Some(tokio::time::Instant::now() + self.header_wait_limit);
        w.timer = None;
    }

    /// Whether `dir`'s wait is past its deadline (registers `cx` for it).
    fn wait_expired(&mut self, cx: &mut std::task::Context<'_>, dir: Dir) -> bool {
        let w = &mut self.waits[side(dir)];
        let Some(until) = w.until else {
            return false;
        };
        let timer = w
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if std::future::Future::poll(timer.as_mut(), cx).is_pending() {
            return false;
        }
        w.until = None;
        w.timer = None;
        true
    }

    /// Delivers callout answers while `dir`'s body or trailers wait, until
    /// the wait settles (`Ready(None)`: the outcome is in its `body_done` /
    /// `trailers_done`) or a local response or failure ends the stream
    /// (`Ready(Some)`). Registers `cx` while `Pending`.
    fn poll_waiting(
        &mut self,
        cx: &mut std::task::Context<'_>,
        dir: Dir,
    ) -> Poll<Option<Response<Bytes>>> {
        let d = side(dir);
        loop {
            let Some(k) = self.waits[d].waited() else {
                self.waits[d].until = None;
                self.waits[d].timer = None;
                return Poll::Ready(None);
            };
            let pos = order(dir, self.slots.len(), k);
            let expired = self.wait_expired(cx, dir);
            if expired {
                tracing::debug!(filter = %self.name(pos), "filter held a body or trailers past the wait limit");
            }
            if expired || self.pending_of(pos) == 0 {
                // Nothing left that could resume it.
                match self.fail(pos, &Failure::Stuck) {
                    Step::Respond(r) => {
                        self.waits[d].body = None;
                        self.waits[d].trailers = None;
                        return Poll::Ready(Some(*r));
                    }
                    step => {
                        self.settle_wait(pos, &step);
                        continue;
                    }
                }
            }
            let done = match self.events.as_mut().map(|(_, rx)| rx.poll_recv(cx)) {
                Some(Poll::Pending) => {
                    self.waits[d].waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Some(Poll::Ready(Some(done))) => done,
                // No answer can come any more.
                None | Some(Poll::Ready(None)) => {
                    for s in &mut self.slots {
                        s.pending = 0;
                    }
                    continue;
                }
            };
            if let (_, Step::Respond(r)) = self.deliver(done) {
                let w = &mut self.waits[d];
                w.body = None;
                w.trailers = None;
                w.body_done = None;
                w.trailers_done = None;
                return Poll::Ready(Some(*r));
            }
        }
    }

    /// After [`BodyVerdict::Wait`] from `dir`'s body: delivers callout
    /// answers as they come until the waiting filter resumes its body (the
    /// rest of the chain then runs on it: `Forward`, or `Respond`), answers
    /// locally, or fails (no callout of its own left that could resume it:
    /// its `fail` policy). Registers `cx` for the next answer while it
    /// returns `Pending` (answers a concurrent header phase or the other
    /// body delivers wake it too). Without a wait it is `Forward` of nothing.
    pub(crate) fn poll_body_wait(
        &mut self,
        cx: &mut std::task::Context<'_>,
        dir: Dir,
    ) -> Poll<BodyVerdict> {
        let d = side(dir);
        if self.waits[d].body_done.is_none() && self.waits[d].body.is_some() {
            match self.poll_waiting(cx, dir) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(r)) => return Poll::Ready(BodyVerdict::Respond(r)),
                Poll::Ready(None) => {}
            }
        }
        Poll::Ready(
            self.waits[d]
                .body_done
                .take()
                .unwrap_or(BodyVerdict::Forward(Bytes::new())),
        )
    }

    /// After [`Verdict::Wait`] from `dir`'s trailers phase: as
    /// [`Self::poll_body_wait`], then writes the trailers (as the filters
    /// left them) into `trailers`.
    pub(crate) fn poll_trailers_wait(
        &mut self,
        cx: &mut std::task::Context<'_>,
        dir: Dir,
        trailers: &mut HeaderMap,
    ) -> Poll<Verdict> {
        let d = side(dir);
        if self.waits[d].trailers_done.is_none() && self.waits[d].trailers.is_some() {
            match self.poll_waiting(cx, dir) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(r)) => return Poll::Ready(Verdict::Respond(r)),
                Poll::Ready(None) => {}
            }
        }
        if let Some(data) = self.data.as_deref_mut() {
            let t = match dir {
                Dir::Request => data.req_trailers.clone(),
                Dir::Response => data.resp_trailers.clone(),
            };
            *trailers = t.unwrap_or_default();
        }
        Poll::Ready(
            self.waits[d]
                .trailers_done
                .take()
                .unwrap_or(Verdict::Continue),
        )
    }

    /// After filter `from` ran a callback: if a body or trailers of either
    /// direction wait on it and the callback resumed them (or the filter is
    /// now skipped), the rest of the chain runs and the outcome waits in
    /// that direction's `body_done` / `trailers_done` for the poll, woken
    /// here. A local response ends them.
    fn settle_wait(&mut self, from: usize, step: &Step) {
        for dir in [Dir::Request, Dir::Response] {
            self.settle_dir(dir, from, step);
        }
    }

    fn settle_dir(&mut self, dir: Dir, from: usize, step: &Step) {
        let d = side(dir);
        let Some(k) = self.waits[d].waited() else {
            return;
        };
        let pos = order(dir, self.slots.len(), k);
        let resumed = match step {
            Step::Respond(_) => true,
            Step::Go {
                resume_request,
                resume_response,
                ..
            } => {
                let resumed = match dir {
                    Dir::Request => *resume_request,
                    Dir::Response => *resume_response,
                };
                (from == pos && resumed) || self.slots.get(pos).is_none_or(|s| s.skipped)
            }
        };
        if !resumed {
            return;
        }
        if let Some(w) = self.waits[d].body.take() {
            let v = match step {
                Step::Respond(r) => BodyVerdict::Respond(copy_response(r)),
                Step::Go { .. } => match self.body_from(dir, k + 1, w.buf, true) {
                    // A later filter waits now: the wait is its.
                    BodyVerdict::Wait => return,
                    v => v,
                },
            };
            self.waits[d].body_done = Some(v);
        } else {
            self.waits[d].trailers = None;
            let v = match step {
                Step::Respond(r) => Verdict::Respond(copy_response(r)),
                Step::Go { .. } => match self.trailers_from(dir, k + 1) {
                    Verdict::Wait => return,
                    v => v,
                },
            };
            self.waits[d].trailers_done = Some(v);
        }
        if let Some(w) = self.waits[d].waker.take() {
            w.wake();
        }
    }

    /// Whether a filter of the chain exports `dir`'s body callback, i.e.
    /// may change that body's length (`forward` holds a head with
    /// `content-length` until the first chunk went through, for it).
    pub(crate) fn has_body_callback(&self, dir: Dir) -> bool {
        self.slots.iter().any(|s| {
            !s.skipped
                && self
                    .set
                    .plugins
                    .get(s.idx)
                    .is_some_and(|p| p.shared.body_callbacks[side(dir)])
        })
    }

    /// `dir`'s body no longer matches the `content-length` its head went
    /// with (a filter changed its length after the head left): counts it
    /// for each filter that resized a chunk of it, and logs it once per
    /// filter with the filter's name.
    pub(crate) fn report_misframed(&self, dir: Dir) {
        let bits = self.resized[side(dir)];
        for (pos, slot) in self.slots.iter().enumerate() {
            if bits & (1u64 << pos.min(63)) == 0 {
                continue;
            }
            if let Some(p) = self.set.plugins.get(slot.idx) {
                p.shared.stats.misframed(
                    &p.shared.name,
                    match dir {
                        Dir::Request => "request",
                        Dir::Response => "response",
                    },
                );
            }
        }
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
        let verdict = self.trailers_from(dir, 0);
        if matches!(verdict, Verdict::Wait) {
            // The trailers stay in the stream until `poll_trailers_wait`.
            return verdict;
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

    /// Runs the trailer callbacks of filters `start..` (in `dir`'s order).
    /// A filter that pauses with a callout pending holds the trailers
    /// (`Wait`); a pause with nothing that could resume it continues.
    fn trailers_from(&mut self, dir: Dir, start: usize) -> Verdict {
        let n = self.slots.len();
        for k in start..n {
            let pos = order(dir, n, k);
            let count = trailers_len(self.data.as_deref(), dir);
            let cb = match dir {
                Dir::Request => Callback::RequestTrailers { n: count },
                Dir::Response => Callback::ResponseTrailers { n: count },
            };
            match self.run_one(pos, cb) {
                Step::Respond(r) => return Verdict::Respond(*r),
                Step::Go {
                    pause: true,
                    resume_request,
                    resume_response,
                } if self.slots.get(pos).is_some_and(|s| s.pending > 0) => {
                    let resumed = match dir {
                        Dir::Request => resume_request,
                        Dir::Response => resume_response,
                    };
                    if !resumed {
                        self.waits[side(dir)].trailers = Some(k);
                        self.start_wait(dir);
                        return Verdict::Wait;
                    }
                }
                Step::Go { .. } => {}
            }
        }
        Verdict::Continue
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

    /// The connection the upstream's response came on (`upstream.*`
    /// TLS facts, `upstream.local_address`).
    pub fn set_upstream_conn(&mut self, conn: Arc<crate::tls::UpstreamConn>) {
        if let Some(d) = self.data.as_deref_mut() {
            d.upstream_conn = Some(conn);
        }
    }

    /// Why connecting to the upstream failed (`upstream.transport_failure_reason`).
    pub fn set_upstream_failure(&mut self, reason: &str) {
        if let Some(d) = self.data.as_deref_mut() {
            d.upstream_failure = Some(Box::from(reason));
        }
    }

    /// A response the proxy made itself instead of forwarding: its
    /// `x-wasp-error` code (`wasp.error`) and its head, so `on_log` sees the
    /// status the client got (`response.code`) even though no response
    /// callback ran.
    pub fn set_local_reply<B>(&mut self, code: &'static str, resp: &http::Response<B>) {
        if let Some(d) = self.data.as_deref_mut() {
            d.error_code = Some(code);
            d.heads_sent = [true; 2];
            d.usage[1] = map_usage(resp.headers());
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
        // A body task parked in `poll_body_wait`/`poll_trailers_wait` has
        // only this stream to wake it: woken, it finds the chain gone and
        // fails its body instead of pending forever (with an HTTP/2
        // upstream, holding a stream slot).
        self.wake_waiters();
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
                    vm.end_context(slot.ctx, data, log && !slot.skipped)?;
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
