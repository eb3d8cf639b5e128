//! Bodies through the Wasm filter chain.
//!
//! The header phases run inline in `super::phases`; this module carries
//! the chain along the bodies, which hyper polls from other tasks of the same
//! worker (the upstream connection task polls the request body, the
//! downstream connection task the response body). The chain is therefore
//! shared per request behind an async mutex that only this request's tasks,
//! all on one thread, ever take. A header phase holds it across its awaits;
//! the bodies only try it, never wait. A body that finds it out for a
//! header phase (the request body, when the upstream answered before it
//! ended and a response-header callback is slow) keeps the frame it pulled
//! (data, trailers, end of stream) and parks until the phase lets go: no
//! frame passes the filters unseen, and the header phase never waits on a
//! body. A body that finds the stream already ended (`finish` ran) fails
//! rather than pass a chunk no filter can see.
//!
//! What the core learns about the exchange while a header phase holds the
//! chain (the upstream's address and connection, a misframed body) is
//! recorded beside it ([`SharedChain::record`]) and handed to the filters
//! by the next holder, at the latest before `on_log`. Whether a filter has
//! a body callback is fixed when the chain is made and read without the
//! lock.
//!
//! A message with a declared `content-length` that a filter's body callback
//! may resize has its head held by `phases` until the first frame came out
//! of the filters ([`FilteredBody::prime`]); the head is then framed by what
//! they made of the body ([`Framing`]), and a later change that no longer
//! fits the length the head went with is cut there and reported.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::filter::{BodyVerdict, Dir, StreamFilters, Verdict};
use crate::tls::UpstreamConn;
use crate::upstream::BoxError;

/// One request's filter chain, shared by its header phases and its bodies.
#[derive(Clone)]
pub struct SharedChain {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once the stream has ended ([`SharedChain::finish`]).
    chain: futures_util::lock::Mutex<Option<StreamFilters>>,
    /// A local response a filter made while the request body streamed.
    local: Mutex<Option<http::Response<Bytes>>>,
    request_bytes: AtomicU64,
    /// A body found the chain out for a header phase: woken when the
    /// chain is put back. One per side (request, response): both bodies
    /// may wait at once.
    waiters: [Mutex<Option<Waker>>; 2],
    /// Whether a filter of the chain has a body callback, per side
    /// (request, response): fixed when the chain is made, read without
    /// the lock. A filter skipped later (fail-open after a failure) still
    /// counts, so a head may be held for its first body chunk when no
    /// filter left would change it: a short needless wait, never a body
    /// passing unfiltered, and rare enough to leave so.
    body_callbacks: [bool; 2],
    /// Facts recorded while the chain was out, for its next holder;
    /// `any_owed` says whether to look (no lock taken per chunk).
    owed: Mutex<Vec<Fact>>,
    any_owed: AtomicBool,
}

/// Something the core learnt about the exchange that the filters read
/// later (properties, `on_log`, metrics): never dropped because a header
/// phase had the chain at the time ([`SharedChain::record`]).
pub enum Fact {
    /// The route and cluster picked (`route_name`, `cluster_name`).
    Route(Arc<str>, Arc<str>),
    /// The endpoint being tried (`upstream.address`).
    Upstream(std::net::SocketAddr),
    /// The connection the response came on (`upstream.*`).
    UpstreamConn(Arc<UpstreamConn>),
    /// Why connecting failed (`upstream.transport_failure_reason`).
    UpstreamFailure(Box<str>),
    /// A body no longer matches the length its head went with.
    Misframed(Side),
}

impl Fact {
    fn apply(self, c: &mut StreamFilters) {
        match self {
            Fact::Route(route, cluster) => c.set_route(route, cluster),
            Fact::Upstream(addr) => c.set_upstream(addr),
            Fact::UpstreamConn(conn) => c.set_upstream_conn(conn),
            Fact::UpstreamFailure(reason) => c.set_upstream_failure(&reason),
            Fact::Misframed(side) => c.report_misframed(side.dir()),
        }
    }
}

/// Why a body could not have the chain.
enum Unavailable {
    /// A header phase has it: park until it lets go.
    Busy,
    /// The stream ended (`finish`): no filter can see anything any more.
    Ended,
}

/// A header phase's hold on the chain. Letting go (also when the phase's
/// future is dropped midway) hands the chain what was recorded meanwhile
/// and wakes the bodies that found it out.
struct Phase<'a> {
    shared: &'a SharedChain,
    slot: Option<futures_util::lock::MutexGuard<'a, Option<StreamFilters>>>,
}

impl Phase<'_> {
    fn chain(&mut self) -> Option<&mut StreamFilters> {
        self.slot.as_mut()?.as_mut()
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            if let Some(chain) = slot.as_mut() {
                self.shared.settle_owed(chain);
            }
        }
        self.shared.wake_waiting_body();
    }
}

/// A header phase of the chain: over already (`None`: the stream had
/// ended), or the rest of it, to await. Boxed only then: the rest is a
/// large future, which a request whose filters do not wait never makes.
pub enum HeaderPhase<'a> {
    Done(Option<Verdict>),
    Later(Pin<Box<dyn Future<Output = Option<Verdict>> + Send + 'a>>),
}

/// Returned by the request body when a filter answered locally mid-body; the
/// upstream request is abandoned and [`SharedChain::take_local`] has the answer.
#[derive(Debug, thiserror::Error)]
#[error("a filter answered the request while its body streamed")]
pub struct AnsweredLocally;

impl SharedChain {
    pub fn new(chain: StreamFilters) -> Self {
        let body_callbacks = [
            chain.has_body_callback(Dir::Request),
            chain.has_body_callback(Dir::Response),
        ];
        Self {
            inner: Arc::new(Inner {
                chain: futures_util::lock::Mutex::new(Some(chain)),
                local: Mutex::new(None),
                request_bytes: AtomicU64::new(0),
                waiters: [Mutex::new(None), Mutex::new(None)],
                body_callbacks,
                owed: Mutex::new(Vec::new()),
                any_owed: AtomicBool::new(false),
            }),
        }
    }

    /// Takes the chain for a header phase, waiting for it.
    async fn phase(&self) -> Phase<'_> {
        let mut phase = Phase {
            shared: self,
            slot: Some(self.inner.chain.lock().await),
        };
        if let Some(chain) = phase.chain() {
            self.settle_owed(chain);
        }
        phase
    }

    /// Runs the request-header filters; `None` once the stream ended.
    pub async fn request_headers(
        &self,
        head: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Option<Verdict> {
        let mut phase = self.phase().await;
        let verdict = phase.chain()?.request_headers(head, end_of_stream).await;
        Some(verdict)
    }

    /// Runs the response-header filters; `None` once the stream ended.
    /// While they run, a request body chunk still on its way waits for
    /// them (see the module docs).
    pub async fn response_headers(
        &self,
        head: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Option<Verdict> {
        let mut phase = self.phase().await;
        let verdict = phase.chain()?.response_headers(head, end_of_stream).await;
        Some(verdict)
    }

    /// The request-header filters, run at once as far as they go without
    /// waiting (the common case: every filter has an idle instance and
    /// none pauses); only a phase that must wait (an instance being
    /// built, a paused filter) hands back the boxed rest of it. Either
    /// way the chain is held as a [`Phase`]: letting go settles what was
    /// recorded meanwhile and wakes bodies that found it out.
    pub fn request_headers_phase<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
        end_of_stream: bool,
    ) -> HeaderPhase<'a> {
        // A header phase holds the chain across its awaits; the bodies
        // only try it, synchronously: free here unless another header
        // phase of this stream waits (then queue behind it, as before).
        let Some(slot) = self.inner.chain.try_lock() else {
            return HeaderPhase::Later(Box::pin(self.request_headers(head, end_of_stream)));
        };
        let mut phase = Phase {
            shared: self,
            slot: Some(slot),
        };
        let Some(chain) = phase.chain() else {
            return HeaderPhase::Done(None);
        };
        self.settle_owed(chain);
        match chain.request_headers_now(head, end_of_stream) {
            Ok(v) => HeaderPhase::Done(Some(v)),
            // The chain stays held across the wait, as in `request_headers`.
            Err(wait) => HeaderPhase::Later(Box::pin(async move {
                let v = phase.chain()?.request_headers_later(head, wait).await;
                Some(v)
            })),
        }
    }

    /// The response-header filters, as [`Self::request_headers_phase`].
    pub fn response_headers_phase<'a>(
        &'a self,
        head: &'a mut http::response::Parts,
        end_of_stream: bool,
    ) -> HeaderPhase<'a> {
        let Some(slot) = self.inner.chain.try_lock() else {
            return HeaderPhase::Later(Box::pin(self.response_headers(head, end_of_stream)));
        };
        let mut phase = Phase {
            shared: self,
            slot: Some(slot),
        };
        let Some(chain) = phase.chain() else {
            return HeaderPhase::Done(None);
        };
        self.settle_owed(chain);
        match chain.response_headers_now(head, end_of_stream) {
            Ok(v) => HeaderPhase::Done(Some(v)),
            Err(wait) => HeaderPhase::Later(Box::pin(async move {
                let v = phase.chain()?.response_headers_later(head, wait).await;
                Some(v)
            })),
        }
    }

    /// Hands `fact` to the filters now if the chain is free, else to its
    /// next holder. Dropped only once the stream has ended (`on_log` has
    /// run: nothing would read it).
    pub fn record(&self, fact: Fact) {
        match self.inner.chain.try_lock() {
            Some(mut slot) => {
                if let Some(chain) = slot.as_mut() {
                    self.settle_owed(chain);
                    fact.apply(chain);
                }
            }
            None => {
                if let Ok(mut owed) = self.inner.owed.lock() {
                    owed.push(fact);
                    self.inner.any_owed.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Applies what was recorded while the chain was out, in order.
    fn settle_owed(&self, chain: &mut StreamFilters) {
        // A plain load first: this runs for every body chunk, and almost
        // never finds anything owed.
        if !self.inner.any_owed.load(Ordering::Relaxed)
            || !self.inner.any_owed.swap(false, Ordering::Acquire)
        {
            return;
        }
        let owed = match self.inner.owed.lock() {
            Ok(mut owed) => std::mem::take(&mut *owed),
            Err(_) => return,
        };
        for fact in owed {
            fact.apply(chain);
        }
    }

    /// Test support: holds the chain as a header phase does, until the
    /// returned guard is dropped.
    #[cfg(test)]
    pub(crate) async fn hold(&self) -> impl Drop + '_ {
        self.phase().await
    }

    /// A body found the chain held by a header phase (`try_lock`
    /// registers no waker): wake it now the phase let go.
    fn wake_waiting_body(&self) {
        for waiter in &self.inner.waiters {
            if let Some(w) = waiter.lock().ok().and_then(|mut w| w.take()) {
                w.wake();
            }
        }
    }

    /// Parks a body of `side` until a header phase puts the chain back.
    fn park(&self, side: Side, cx: &Context<'_>) {
        if let Some(Ok(mut w)) = self.inner.waiters.get(side.index()).map(|w| w.lock()) {
            *w = Some(cx.waker().clone());
        }
    }

    /// Runs `f` on the chain unless a header phase has it (or the stream
    /// ended); never waits.
    pub fn with<R>(&self, f: impl FnOnce(&mut StreamFilters) -> R) -> Option<R> {
        self.try_with(f).ok()
    }

    /// As [`Self::with`], saying why not.
    fn try_with<R>(&self, f: impl FnOnce(&mut StreamFilters) -> R) -> Result<R, Unavailable> {
        let mut slot = self.inner.chain.try_lock().ok_or(Unavailable::Busy)?;
        let chain = slot.as_mut().ok_or(Unavailable::Ended)?;
        self.settle_owed(chain);
        Ok(f(chain))
    }

    /// Whether a filter of the chain has a body callback for `side` (and
    /// so may change that body's length); known without the chain.
    pub fn has_body_callback(&self, side: Side) -> bool {
        let [request, response] = self.inner.body_callbacks;
        match side {
            Side::Request => request,
            Side::Response => response,
        }
    }

    pub fn take_local(&self) -> Option<http::Response<Bytes>> {
        self.inner.local.lock().ok()?.take()
    }

    /// Ends the stream for the filters (`on_log`, `on_done`, `on_delete`).
    /// Called when hyper drops the response body, after every header phase
    /// has returned; a second call finds the stream already ended.
    pub fn finish(&self, response_bytes: u64) {
        let Some(mut slot) = self.inner.chain.try_lock() else {
            // A header phase still holds the chain: its future outlived the
            // response it was producing (not expected: they all end before
            // `serve` returns). The filters then get no on_log/on_done; say
            // so rather than lose them silently. No debug_assert: this runs
            // in a body's drop, where a panic would abort.
            tracing::warn!(
                "filter chain busy when the stream ended: on_log and on_done skipped for this request"
            );
            return;
        };
        let chain = slot.take();
        drop(slot);
        // A body parked on the chain finds the stream ended.
        self.wake_waiting_body();
        if let Some(mut chain) = chain {
            self.settle_owed(&mut chain);
            chain.finish(
                self.inner.request_bytes.load(Ordering::Relaxed),
                response_bytes,
            );
        }
    }
}

/// Which side of the exchange a body is on.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Request,
    Response,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Request => 0,
            Side::Response => 1,
        }
    }

    fn dir(self) -> Dir {
        match self {
            Side::Request => Dir::Request,
            Side::Response => Dir::Response,
        }
    }
}

pin_project_lite::pin_project! {
    /// A body whose data and trailers pass through the chain.
    pub struct FilteredBody<B> {
        #[pin]
        inner: B,
        chain: SharedChain,
        side: Side,
        ended: bool,
        pending_trailers: Option<HeaderMap>,
        // The body ended and a filter waits for a callout before letting it
        // go (with the trailers that ended it, if any).
        waiting: Option<Option<HeaderMap>>,
        // A filter paused on the trailers to wait for a callout.
        waiting_trailers: bool,
        // Data bytes read from `inner`, and given out after the filters.
        passed_in: u64,
        passed_out: u64,
        // The first frame out of the filters, read by [`FilteredBody::prime`]
        // while the head was held; given out first.
        primed: Option<Frame<Bytes>>,
        // The `content-length` the head went on with: never more bytes
        // than that (the rest is dropped), and a body that does not
        // match it is reported once.
        declared: Option<u64>,
        misframe_reported: bool,
        // A frame pulled from `inner` while the chain was out for a header
        // phase: through the filters first when it is back.
        stalled: Option<Pulled>,
    }
}

/// One frame of the inner body on its way through the filters.
struct Pulled {
    data: Bytes,
    trailers: Option<HeaderMap>,
    eos: bool,
    /// The body callbacks ran on it already; only its trailers are left.
    body_ran: bool,
}

/// What the filters made of a body's length by the time its first frame
/// came out of them ([`FilteredBody::prime`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The body ended while its head was held: this is its whole length.
    Ended(u64),
    /// What passed the filters so far differs in length from what came in.
    Changed,
    /// Same length so far.
    Unchanged,
}

impl<B> FilteredBody<B> {
    pub fn new(inner: B, chain: SharedChain, side: Side) -> Self {
        Self {
            inner,
            chain,
            side,
            ended: false,
            pending_trailers: None,
            waiting: None,
            waiting_trailers: false,
            passed_in: 0,
            passed_out: 0,
            primed: None,
            declared: None,
            misframe_reported: false,
            stalled: None,
        }
    }
}

impl<B> FilteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    /// Runs the body through the filters until its first frame comes out
    /// of them (a filter that pauses keeps it buffering, within the
    /// filters' body limits) or it ends, and keeps that frame for the next
    /// poll. The caller holds the head meanwhile and frames it by the
    /// answer. A failure is the body's (a filter's answer is in
    /// [`SharedChain::take_local`]).
    pub async fn prime(mut self: Pin<&mut Self>) -> Result<Framing, BoxError> {
        let first = std::future::poll_fn(|cx| self.as_mut().poll_frame(cx)).await;
        let this = self.project();
        match first {
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => *this.primed = Some(frame),
            None => {}
        }
        let ended = *this.ended
            && this.waiting.is_none()
            && !*this.waiting_trailers
            && this.stalled.is_none();
        Ok(if ended {
            Framing::Ended(*this.passed_out)
        } else if *this.passed_in != *this.passed_out {
            Framing::Changed
        } else {
            Framing::Unchanged
        })
    }

    /// The head goes on with `content-length: n` (when `Some`), not held.
    pub fn declared(mut self, n: Option<u64>) -> Self {
        self.declared = n;
        self
    }

    /// The head went on with `content-length: n`.
    pub fn declare(self: Pin<&mut Self>, n: u64) {
        *self.project().declared = Some(n);
    }

    /// Reports (once) a body that no longer matches its declared length;
    /// recorded for the chain's next holder if a header phase has it.
    fn misframed(self: Pin<&mut Self>) {
        let this = self.project();
        if !*this.misframe_reported {
            *this.misframe_reported = true;
            this.chain.record(Fact::Misframed(*this.side));
        }
    }

    /// The chain is out: `Busy` parks the body until the header phase
    /// lets go (the caller keeps what it holds); `Ended` is the body's
    /// failure, since no filter could see the rest.
    fn unavailable(
        chain: &SharedChain,
        side: Side,
        why: Unavailable,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match why {
            Unavailable::Busy => {
                chain.park(side, cx);
                // Workers are current-thread runtimes and a request stays
                // on its worker, so no phase lets go between the try and
                // the park today; one more try_lock keeps a wake given in
                // that gap from being lost should a body ever be polled
                // off its worker.
                if chain.inner.chain.try_lock().is_some() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            Unavailable::Ended => Poll::Ready(Some(Err(
                "the filter chain ended before the body: the rest cannot be filtered".into(),
            ))),
        }
    }

    /// The filtered frames, before the declared length is applied.
    fn poll_filtered(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(t) = this.pending_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        let side = *this.side;
        if *this.waiting_trailers {
            let mut t = HeaderMap::new();
            let v = match this
                .chain
                .try_with(|c| c.poll_trailers_wait(cx, side.dir(), &mut t))
            {
                Ok(Poll::Ready(v)) => v,
                Ok(Poll::Pending) => return Poll::Pending,
                Err(why) => return Self::unavailable(this.chain, side, why, cx),
            };
            *this.waiting_trailers = false;
            if let Verdict::Respond(resp) = v {
                return Poll::Ready(Some(Err(respond(this.chain, side, resp))));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        loop {
            let (pulled, verdict) = if let Some(trailers) = this.waiting.take() {
                let verdict = match this.chain.try_with(|c| c.poll_body_wait(cx, side.dir())) {
                    Ok(Poll::Pending) => {
                        *this.waiting = Some(trailers);
                        return Poll::Pending;
                    }
                    Ok(Poll::Ready(v)) => v,
                    Err(why) => {
                        // The held body is in the chain: wait for it to
                        // come back.
                        *this.waiting = Some(trailers);
                        return Self::unavailable(this.chain, side, why, cx);
                    }
                };
                let pulled = Pulled {
                    data: Bytes::new(),
                    trailers,
                    eos: true,
                    body_ran: true,
                };
                (pulled, verdict)
            } else {
                let pulled = match this.stalled.take() {
                    // Pulled while the chain was out: its turn now.
                    Some(p) => p,
                    None => {
                        if *this.ended {
                            return Poll::Ready(None);
                        }
                        let frame = match this.inner.as_mut().poll_frame(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                            Poll::Ready(Some(Ok(f))) => Some(f),
                            Poll::Ready(None) => None,
                        };
                        let (data, trailers, eos) = match frame {
                            None => (Bytes::new(), None, true),
                            Some(f) => match f.into_data() {
                                Ok(d) => {
                                    let eos = this.inner.is_end_stream();
                                    (d, None, eos)
                                }
                                Err(f) => match f.into_trailers() {
                                    Ok(t) => (Bytes::new(), Some(t), true),
                                    Err(_) => continue,
                                },
                            },
                        };
                        if eos {
                            *this.ended = true;
                        }
                        *this.passed_in = this.passed_in.saturating_add(data.len() as u64);
                        if let Side::Request = side {
                            this.chain
                                .inner
                                .request_bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        Pulled {
                            data,
                            trailers,
                            eos,
                            body_ran: false,
                        }
                    }
                };
                if pulled.body_ran {
                    (pulled, BodyVerdict::Forward(Bytes::new()))
                } else {
                    let ran = this.chain.try_with(|c| match side {
                        Side::Request => c.request_body(pulled.data.clone(), pulled.eos),
                        Side::Response => c.response_body(pulled.data.clone(), pulled.eos),
                    });
                    match ran {
                        Ok(v) => (pulled, v),
                        // Nothing the filters could change: the end passes.
                        Err(Unavailable::Ended)
                            if pulled.data.is_empty() && pulled.trailers.is_none() =>
                        {
                            if pulled.eos {
                                return Poll::Ready(None);
                            }
                            continue;
                        }
                        Err(why) => {
                            // Kept whole (data, trailers, end of stream)
                            // for when the header phase lets go.
                            *this.stalled = Some(pulled);
                            return Self::unavailable(this.chain, side, why, cx);
                        }
                    }
                }
            };
            let Pulled { eos, trailers, .. } = pulled;
            let out = match verdict {
                BodyVerdict::Forward(b) => b,
                BodyVerdict::Hold => {
                    if eos && trailers.is_none() {
                        return Poll::Ready(None);
                    }
                    Bytes::new()
                }
                BodyVerdict::Wait => {
                    *this.waiting = Some(trailers);
                    continue;
                }
                BodyVerdict::Respond(resp) => {
                    return Poll::Ready(Some(Err(respond(this.chain, side, resp))))
                }
            };
            let trailers = match trailers {
                Some(mut t) => {
                    let v = this.chain.try_with(|c| match side {
                        Side::Request => c.request_trailers(&mut t),
                        Side::Response => c.response_trailers(&mut t),
                    });
                    match v {
                        Ok(Verdict::Respond(resp)) => {
                            return Poll::Ready(Some(Err(respond(this.chain, side, resp))));
                        }
                        Ok(Verdict::Wait) => {
                            // Held in the chain: data first, then the wait.
                            *this.waiting_trailers = true;
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        Ok(_) => Some(t),
                        Err(why) => {
                            // Out since the body ran, in this same poll:
                            // not expected on a current-thread worker
                            // (nothing else runs in between), handled
                            // anyway: the trailers wait their turn, the
                            // data that ran goes on.
                            *this.stalled = Some(Pulled {
                                data: Bytes::new(),
                                trailers: Some(t),
                                eos: true,
                                body_ran: true,
                            });
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            return Self::unavailable(this.chain, side, why, cx);
                        }
                    }
                }
                None => None,
            };
            if !out.is_empty() {
                *this.pending_trailers = trailers;
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if let Some(t) = trailers {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if eos {
                return Poll::Ready(None);
            }
        }
    }
}

impl<B> Body for FilteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.as_mut().project().primed.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let polled = match self.as_mut().poll_filtered(cx) {
                Poll::Ready(p) => p,
                Poll::Pending => return Poll::Pending,
            };
            let this = self.as_mut().project();
            let declared = *this.declared;
            let frame = match polled {
                Some(Ok(frame)) => frame,
                None => {
                    if declared.is_some_and(|n| *this.passed_out < n) {
                        self.as_mut().misframed();
                    }
                    return Poll::Ready(None);
                }
                other => return Poll::Ready(other),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let len = data.len() as u64;
            let Some(n) = declared else {
                *this.passed_out = this.passed_out.saturating_add(len);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            };
            // Never more than the head declared: the client reads exactly
            // that many bytes as this response, and whatever followed
            // would be read as the next one.
            let left = n.saturating_sub(*this.passed_out);
            if len <= left {
                *this.passed_out = this.passed_out.saturating_add(len);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            *this.passed_out = n;
            self.as_mut().misframed();
            if left > 0 {
                let cut = data.slice(..usize::try_from(left).unwrap_or(data.len()));
                return Poll::Ready(Some(Ok(Frame::data(cut))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            && self.primed.is_none()
            && self.pending_trailers.is_none()
            && self.waiting.is_none()
            && !self.waiting_trailers
            && self.stalled.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Filters may change the size.
        SizeHint::default()
    }
}

/// A filter answered locally in the middle of a body. The answer is kept
/// for whoever still can send it: on the request side it replaces the
/// upstream's; on a local reply's body (`phases::filter_answer`, head not
/// yet sent) it replaces that reply. On a streamed response the status has
/// already gone out, so the stream is cut and the reason logged.
fn respond(chain: &SharedChain, side: Side, resp: http::Response<Bytes>) -> BoxError {
    let status = resp.status().as_u16();
    if let Ok(mut slot) = chain.inner.local.lock() {
        *slot = Some(resp);
    }
    match side {
        Side::Request => Box::new(AnsweredLocally),
        Side::Response => {
            tracing::warn!(
                status,
                "a filter answered locally from a response body callback; the response is cut unless its head was still held (a local reply, or a body with content-length held for the filters)"
            );
            "response cut by a filter".into()
        }
    }
}
