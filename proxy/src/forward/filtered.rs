//! Bodies through the Wasm filter chain.
//!
//! The header phases run inline in [`super::forward`]; this module carries
//! the chain along the bodies, which hyper polls from other tasks of the same
//! worker (the upstream connection task polls the request body, the
//! downstream connection task the response body). The chain is therefore
//! shared per request behind a mutex that only this request's tasks, all on
//! one thread, ever take: it is never contended. While an async header
//! phase has the chain out of the slot, a body chunk passes unfiltered
//! (only possible when the upstream answers before the request body ended).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::filter::{BodyVerdict, StreamFilters, Verdict};
use crate::upstream::BoxError;

/// One request's filter chain, shared by its header phases and its bodies.
#[derive(Clone)]
pub struct SharedChain {
    inner: Arc<Inner>,
}

struct Inner {
    chain: Mutex<Option<StreamFilters>>,
    /// A local response a filter made while the request body streamed.
    local: Mutex<Option<http::Response<Bytes>>>,
    request_bytes: AtomicU64,
    /// A body waiting for a callout found the chain out for a header
    /// phase: woken when the chain is put back.
    waiter: Mutex<Option<Waker>>,
}

/// Returned by the request body when a filter answered locally mid-body; the
/// upstream request is abandoned and [`SharedChain::take_local`] has the answer.
#[derive(Debug, thiserror::Error)]
#[error("a filter answered the request while its body streamed")]
pub struct AnsweredLocally;

impl SharedChain {
    pub fn new(chain: StreamFilters) -> Self {
        Self {
            inner: Arc::new(Inner {
                chain: Mutex::new(Some(chain)),
                local: Mutex::new(None),
                request_bytes: AtomicU64::new(0),
                waiter: Mutex::new(None),
            }),
        }
    }

    /// Takes the chain out for an async phase; give it back with [`Self::put`].
    pub fn take(&self) -> Option<StreamFilters> {
        self.inner.chain.lock().ok()?.take()
    }

    pub fn put(&self, chain: StreamFilters) {
        if let Ok(mut slot) = self.inner.chain.lock() {
            *slot = Some(chain);
        }
        if let Some(w) = self.inner.waiter.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }

    /// Runs `f` on the chain if it is in its slot.
    pub fn with<R>(&self, f: impl FnOnce(&mut StreamFilters) -> R) -> Option<R> {
        let mut slot = self.inner.chain.lock().ok()?;
        slot.as_mut().map(f)
    }

    pub fn take_local(&self) -> Option<http::Response<Bytes>> {
        self.inner.local.lock().ok()?.take()
    }

    /// Ends the stream for the filters (`on_log`, `on_done`, `on_delete`).
    pub fn finish(&self, response_bytes: u64) {
        let chain = self.take();
        if let Some(chain) = chain {
            chain.finish(
                self.inner.request_bytes.load(Ordering::Relaxed),
                response_bytes,
            );
        }
    }
}

/// Which side of the exchange a body is on.
#[derive(Clone, Copy)]
pub enum Side {
    Request,
    Response,
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
    }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(t) = this.pending_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if *this.waiting_trailers {
            let mut t = HeaderMap::new();
            let side = *this.side;
            let v = match this.chain.with(|c| c.poll_trailers_wait(cx, &mut t)) {
                Some(Poll::Ready(v)) => v,
                Some(Poll::Pending) => return Poll::Pending,
                None => {
                    // Out for a response header phase: wait for it to come back.
                    if let Ok(mut w) = this.chain.inner.waiter.lock() {
                        *w = Some(cx.waker().clone());
                    }
                    if this.chain.with(|_| ()).is_some() {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            };
            *this.waiting_trailers = false;
            if let Verdict::Respond(resp) = v {
                return Poll::Ready(Some(Err(respond(this.chain, side, resp))));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        loop {
            let side = *this.side;
            let (data, trailers, eos, verdict) = if let Some(trailers) = this.waiting.take() {
                let verdict = match this.chain.with(|c| c.poll_body_wait(cx)) {
                    Some(Poll::Pending) => {
                        *this.waiting = Some(trailers);
                        return Poll::Pending;
                    }
                    Some(Poll::Ready(v)) => Some(v),
                    None => {
                        // Out for a response header phase: the held body
                        // is in the chain, so wait for it to come back.
                        if let Ok(mut w) = this.chain.inner.waiter.lock() {
                            *w = Some(cx.waker().clone());
                        }
                        *this.waiting = Some(trailers);
                        if this.chain.with(|_| ()).is_some() {
                            continue;
                        }
                        return Poll::Pending;
                    }
                };
                (Bytes::new(), trailers, true, verdict)
            } else {
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
                if let Side::Request = this.side {
                    this.chain
                        .inner
                        .request_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let verdict = this.chain.with(|c| match side {
                    Side::Request => c.request_body(data.clone(), eos),
                    Side::Response => c.response_body(data.clone(), eos),
                });
                (data, trailers, eos, verdict)
            };
            let out = match verdict {
                // The chain is out for a header phase: pass the chunk on.
                None => data,
                Some(BodyVerdict::Forward(b)) => b,
                Some(BodyVerdict::Hold) => {
                    if eos && trailers.is_none() {
                        return Poll::Ready(None);
                    }
                    Bytes::new()
                }
                Some(BodyVerdict::Wait) => {
                    *this.waiting = Some(trailers);
                    continue;
                }
                Some(BodyVerdict::Respond(resp)) => {
                    return Poll::Ready(Some(Err(respond(this.chain, side, resp))))
                }
            };
            let trailers = match trailers {
                Some(mut t) => {
                    let v = this.chain.with(|c| match side {
                        Side::Request => c.request_trailers(&mut t),
                        Side::Response => c.response_trailers(&mut t),
                    });
                    match v {
                        Some(Verdict::Respond(resp)) => {
                            return Poll::Ready(Some(Err(respond(this.chain, side, resp))));
                        }
                        Some(Verdict::Wait) => {
                            // Held in the chain: data first, then the wait.
                            *this.waiting_trailers = true;
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        _ => {}
                    }
                    Some(t)
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

    fn is_end_stream(&self) -> bool {
        self.ended
            && self.pending_trailers.is_none()
            && self.waiting.is_none()
            && !self.waiting_trailers
    }

    fn size_hint(&self) -> SizeHint {
        // Filters may change the size.
        SizeHint::default()
    }
}

/// A filter answered locally in the middle of a body. On the request side
/// the answer replaces the upstream's; on the response side the status has
/// already gone out, so the stream is cut and the reason logged.
fn respond(chain: &SharedChain, side: Side, resp: http::Response<Bytes>) -> BoxError {
    match side {
        Side::Request => {
            if let Ok(mut slot) = chain.inner.local.lock() {
                *slot = Some(resp);
            }
            Box::new(AnsweredLocally)
        }
        Side::Response => {
            tracing::warn!(
                status = resp.status().as_u16(),
                "a filter answered locally after the response had started; closing the stream"
            );
            "response cut by a filter".into()
        }
    }
}
