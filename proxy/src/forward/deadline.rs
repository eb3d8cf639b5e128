//! Per-stream deadlines on the request path, the same for HTTP/1.1 and
//! HTTP/2 streams (the connection guard only sees HTTP/1 bytes, and h2
//! multiplexes many streams on one connection).
//!
//! A [`StreamClock`] is made per request when its listener has a
//! `stream_idle_timeout` or `request_timeout`. Every frame of the request
//! body and of the response body touches it; three places wait on it:
//! the request body (a client that stops sending mid-body), the wait for
//! the response headers (nothing moves while the upstream thinks), and the
//! response body (an upstream that stops mid-body). Each arms one timer
//! (boxed once per request, reset afterwards, never per frame) only when
//! its side is pending, and re-checks the shared clock when it fires, so
//! progress in either direction pushes every deadline back.
//!
//! What a deadline does depends on whether the response has started: the
//! request side fails the request with a [`Cut`], which forward answers
//! 408 (`stream_idle_timeout` / `request_timeout`) while the client still
//! owes request bytes, and 504 (`upstream_timeout`) when the whole request
//! arrived and the upstream is the one not answering; the response side
//! fails the response body, which resets the h2 stream or closes the
//! h1 connection. Either way the request future ends, dropping its cluster
//! admission, filter chain and snapshot.
//!
//! A client that stops reading at the TCP level is a connection matter:
//! the guard sees its writes stall (`listener::guard`) and cuts the
//! connection `stream_idle_timeout` after the last write went through,
//! whatever the client still sends. An h2 stream stalled by its own
//! flow-control window while the connection is healthy is never polled by
//! hyper, so the timers above cannot fire for it: [`Watched`] puts each h2
//! response under its connection's [`Watchdog`] (one task per connection),
//! which drops the body from outside.
//!
//! `request_timeout` runs from the request's start until its body ended
//! or the response headers arrived, whichever is first.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use crate::errors::ErrorCode;
use crate::telemetry::ListenerStats;
use crate::upstream::{BoxError, ProxyBody};

/// `at + after`, saturating: a configured duration too large for the
/// clock means "never" (a year on), not a panic.
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(at)
}

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Cut {
    #[error("no bytes moved either way on the stream for {0:?} (stream_idle_timeout)")]
    Idle(Duration),
    #[error("the whole request did not arrive within {0:?} (request_timeout)")]
    Request(Duration),
}

impl Cut {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Idle(_) => ErrorCode::StreamIdleTimeout,
            Self::Request(_) => ErrorCode::RequestTimeout,
        }
    }
}

/// The last time bytes moved on one request's stream, and its deadlines.
#[derive(Debug)]
pub struct StreamClock {
    origin: Instant,
    /// Nanoseconds from `origin` to the last progress.
    last: AtomicU64,
    idle: Option<Duration>,
    /// `request_timeout` from the request's start, until its body ended or
    /// the response started.
    request: Option<(Instant, Duration)>,
    received: AtomicBool,
    /// The client's request body has ended (not just the response started).
    body_ended: AtomicBool,
}

impl StreamClock {
    /// `None` when neither deadline is configured.
    pub fn new(idle: Option<Duration>, request: Option<Duration>) -> Option<Arc<Self>> {
        if idle.is_none() && request.is_none() {
            return None;
        }
        let origin = Instant::now();
        Some(Arc::new(Self {
            origin,
            last: AtomicU64::new(0),
            idle,
            request: request.map(|r| (later(origin, r), r)),
            received: AtomicBool::new(false),
            body_ended: AtomicBool::new(false),
        }))
    }

    /// Bytes moved (a frame either way).
    pub fn touch(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// The request body has ended: `request_timeout` no longer applies.
    pub fn received(&self) {
        self.body_ended.store(true, Ordering::Relaxed);
        self.response_started();
    }

    /// The response headers arrived: `request_timeout` no longer applies
    /// (as in Envoy), so a bidirectional stream or an upload answered early
    /// runs as long as bytes move.
    pub fn response_started(&self) {
        self.received.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// Whether the client's request body has ended: when nothing moves
    /// after that, the upstream is the one not answering.
    pub fn request_body_ended(&self) -> bool {
        self.body_ended.load(Ordering::Relaxed)
    }

    /// When `stream_idle_timeout` passes if nothing moves from now on.
    fn idle_deadline(&self) -> Option<(Instant, Duration)> {
        let idle = self.idle?;
        let last = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        Some((later(self.origin, last.saturating_add(idle)), idle))
    }

    /// The earliest deadline still pending, and what passing it means.
    fn next(&self) -> Option<(Instant, Cut)> {
        let idle = self.idle_deadline().map(|(at, idle)| (at, Cut::Idle(idle)));
        let request = self
            .request
            .filter(|_| !self.received.load(Ordering::Relaxed))
            .map(|(at, after)| (at, Cut::Request(after)));
        match (idle, request) {
            (Some(i), Some(r)) => Some(if r.0 <= i.0 { r } else { i }),
            (i, r) => i.or(r),
        }
    }

    /// Polls `timer` against the clock: `Ready` with the deadline that
    /// passed, else `Pending` with the timer armed for the next one.
    pub fn poll_expired(
        &self,
        timer: &mut Option<Pin<Box<Sleep>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Cut> {
        loop {
            let Some((at, cut)) = self.next() else {
                return Poll::Pending;
            };
            if Instant::now() >= at {
                return Poll::Ready(cut);
            }
            let sleep = match timer {
                Some(s) => {
                    if s.deadline() != at {
                        s.as_mut().reset(at);
                    }
                    s
                }
                None => timer.insert(Box::pin(tokio::time::sleep_until(at))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Completes when a deadline passes with nothing moving (its timer
    /// lives in the caller's future: no allocation).
    pub async fn expired(&self) -> Cut {
        loop {
            let Some((at, cut)) = self.next() else {
                return std::future::pending().await;
            };
            if Instant::now() >= at {
                return cut;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream's response body as it arrives, before the filters:
    /// touches the clock on every frame, so a body a filter buffers (its
    /// head held, or nothing given out while it pauses) is not idle while
    /// the upstream still sends. [`Timed`], outside the filters, only sees
    /// what they give out.
    pub struct Touching<B> {
        #[pin]
        inner: B,
        clock: Option<Arc<StreamClock>>,
    }
}

impl<B> Touching<B> {
    pub fn new(inner: B, clock: Option<Arc<StreamClock>>) -> Self {
        Self { inner, clock }
    }
}

impl<B: Body<Data = Bytes>> Body for Touching<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(clock)) = (&polled, this.clock.as_deref()) {
            clock.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The response body on its way to the client: touches the clock on
    /// every frame and fails when the clock expires while the upstream
    /// sends nothing.
    pub struct Timed<B> {
        #[pin]
        inner: B,
        clock: Arc<StreamClock>,
        timer: Option<Pin<Box<Sleep>>>,
        stats: ListenerStats,
    }
}

impl<B> Timed<B> {
    pub fn new(inner: B, clock: Arc<StreamClock>, stats: ListenerStats) -> Self {
        Self {
            inner,
            clock,
            timer: None,
            stats,
        }
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Pending => match this.clock.poll_expired(this.timer, cx) {
                Poll::Ready(cut) => {
                    this.stats.error(cut.code());
                    tracing::info!(code = cut.code().as_str(), "response stream cut: {cut}");
                    Poll::Ready(Some(Err(cut.into())))
                }
                Poll::Pending => Poll::Pending,
            },
            ready => {
                this.clock.touch();
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a watched stream's body and its connection's watchdog share.
struct Slot {
    /// The response body, with everything it holds (upstream connection,
    /// cluster admission, filter chain); `None` once the watchdog took it.
    body: Option<ProxyBody>,
    /// The last poll was pending on the body itself: the upstream is the
    /// one to wait for, and `Timed` owns that deadline.
    waiting_upstream: bool,
}

/// One watched stream, as its body and the watchdog see it.
struct Watch {
    slot: Mutex<Slot>,
    clock: Arc<StreamClock>,
    stats: ListenerStats,
    idle: Duration,
}

/// Locks a slot; a poisoned lock still holds a usable body (nothing in
/// here can be left half-updated).
fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The streams one connection's watchdog looks after.
#[derive(Default)]
struct Registry {
    /// Dead entries (bodies that ended) are pruned when the list is full
    /// and by the task's passes; it grows when most entries are live, so a
    /// prune is rare. Its capacity is given back after a burst only at the
    /// next full prune (at most a few KiB per connection: hyper allows 200
    /// concurrent streams).
    streams: Vec<std::sync::Weak<Watch>>,
    /// The watchdog task, started by the connection's first watched body.
    task: Option<tokio::task::AbortHandle>,
    /// When the task looks next; `None` when it is not running.
    next: Option<Instant>,
}

/// One connection's watchdog over its HTTP/2 response bodies ([`Watched`]):
/// a single task per connection, started by its first watched body and
/// aborted when the connection's context is dropped. It sleeps until the
/// earliest idle deadline of the streams it watches. (It was one task per
/// stream: spawning, arming and aborting one was about 2k of the ~73k
/// instructions of an h2c request.)
#[derive(Default)]
pub struct Watchdog {
    registry: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").finish_non_exhaustive()
    }
}

fn lock_registry(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    // Nothing under this lock can be left half-updated.
    registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchdog {
    fn watch(&self, watch: &Arc<Watch>) {
        let mut reg = lock_registry(&self.registry);
        if reg.streams.len() == reg.streams.capacity() {
            reg.streams.retain(|w| w.strong_count() > 0);
            let (live, cap) = (reg.streams.len(), reg.streams.capacity());
            if live > cap / 2 {
                // Mostly live: grow, or a client holding many streams open
                // would make every new stream walk the whole list.
                reg.streams.reserve(live);
            } else if cap > 64 && live < cap / 4 {
                // A burst is over: give its room back.
                reg.streams.shrink_to(live.saturating_mul(2).max(16));
            }
        }
        reg.streams.push(Arc::downgrade(watch));
        let due = watch.clock.idle_deadline().map(|(at, _)| at);
        // `next` is `Some` while the task runs (it clears it, under this
        // lock, as it ends). Every stream of a connection usually has the
        // same timeout, so a new one is due no sooner than the task wakes;
        // a reload that shortened it restarts the task for the earlier
        // deadline.
        match (reg.next, due) {
            (Some(next), Some(due)) if due >= next => return,
            (Some(_), None) => return,
            _ => {}
        }
        if let Some(task) = reg.task.take() {
            task.abort();
        }
        let weak = Arc::downgrade(&self.registry);
        reg.next = Some(due.unwrap_or_else(Instant::now));
        reg.task = Some(tokio::spawn(watch_streams(weak)).abort_handle());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = lock_registry(&self.registry).task.take() {
            task.abort();
        }
    }
}

/// The watchdog's loop: drops the bodies of streams on which nothing moved
/// either way for `stream_idle_timeout` while hyper was not waiting on the
/// upstream, then sleeps until the next deadline.
async fn watch_streams(registry: std::sync::Weak<Mutex<Registry>>) {
    loop {
        let Some(reg) = registry.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut cut = Vec::new();
        {
            let mut reg = lock_registry(&reg);
            reg.streams.retain(|w| {
                let Some(watch) = w.upgrade() else {
                    return false;
                };
                let Some((at, idle)) = watch.clock.idle_deadline() else {
                    return false;
                };
                let wake = if at > now {
                    at
                } else {
                    let taken = {
                        let mut slot = lock(&watch.slot);
                        if slot.waiting_upstream {
                            None
                        } else {
                            slot.body.take()
                        }
                    };
                    match taken {
                        Some(body) => {
                            cut.push((body, watch.stats.clone(), watch.idle));
                            return false;
                        }
                        // Waiting on the upstream: `Timed` cuts it if it
                        // stays silent; look again a timeout later.
                        None => later(now, idle),
                    }
                };
                next = Some(next.map_or(wake, |n| n.min(wake)));
                true
            });
            reg.next = next;
        }
        drop(reg);
        // Dropped outside the locks: a body gives back its upstream
        // connection, cluster admission and filter chain.
        for (body, stats, idle) in cut {
            stats.error(ErrorCode::StreamIdleTimeout);
            tracing::info!(
                code = ErrorCode::StreamIdleTimeout.as_str(),
                "response stream cut: the client took nothing for {idle:?} \
                 (stream_idle_timeout)"
            );
            drop(body);
        }
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            // Nothing to watch: the next stream starts the task again.
            None => return,
        }
    }
}

/// An HTTP/2 response body with a watchdog that does not need hyper to poll
/// it. hyper polls a stream's body only when the client's flow-control
/// window has room, so a client that holds its window at 0 (while still
/// answering pings) would keep the stream, and all the body holds, forever.
/// The connection's [`Watchdog`] wakes at the stream's idle deadline; when
/// nothing moved either way for `stream_idle_timeout` and hyper is not
/// waiting on the upstream, it takes the body out and drops it, giving
/// back the upstream connection, the cluster admission, the filter chain
/// and the request's place in the connection's count. hyper's next poll,
/// if any, ends the stream with an error (a reset).
pub struct Watched {
    watch: Arc<Watch>,
}

impl Watched {
    /// Wraps `body` when the stream has an idle timeout; else returns it.
    pub fn wrap(
        body: ProxyBody,
        clock: Arc<StreamClock>,
        stats: ListenerStats,
        watchdog: &Watchdog,
    ) -> ProxyBody {
        let Some(idle) = clock.idle else {
            return body;
        };
        let watch = Arc::new(Watch {
            slot: Mutex::new(Slot {
                body: Some(body),
                waiting_upstream: false,
            }),
            clock,
            stats,
            idle,
        });
        watchdog.watch(&watch);
        Self { watch }.boxed_unsync()
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut slot = lock(&self.watch.slot);
        let Some(body) = slot.body.as_mut() else {
            return Poll::Ready(Some(Err(Cut::Idle(self.watch.idle).into())));
        };
        let polled = Pin::new(body).poll_frame(cx);
        slot.waiting_upstream = polled.is_pending();
        polled
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.watch.slot)
            .body
            .as_ref()
            .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.watch.slot)
            .body
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn progress_pushes_the_idle_deadline_back() {
        let clock = StreamClock::new(Some(200 * MS), None).unwrap();
        let start = Instant::now();
        tokio::time::sleep(150 * MS).await;
        clock.touch();
        let cut = clock.expired().await;
        assert_eq!(cut, Cut::Idle(200 * MS));
        assert!(start.elapsed() >= 350 * MS, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn request_timeout_ends_with_the_body() {
        let clock = StreamClock::new(Some(300 * MS), Some(100 * MS)).unwrap();
        let start = Instant::now();
        assert_eq!(clock.expired().await, Cut::Request(100 * MS));
        let first = start.elapsed();
        assert!(first >= 100 * MS && first < 300 * MS, "{first:?}");
        clock.received();
        assert_eq!(clock.expired().await, Cut::Idle(300 * MS));
        assert!(start.elapsed() >= first + 300 * MS, "{:?}", start.elapsed());
    }

    /// A body under the connection's watchdog, never polled (as hyper
    /// does not poll a stream whose window is 0).
    fn watched(watchdog: &Watchdog, idle: Duration) -> ProxyBody {
        let metrics = crate::telemetry::Metrics::new();
        let stats = metrics.listener_stats(&Arc::from("l"));
        let body = http_body_util::Full::new(Bytes::from_static(b"x"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let clock = StreamClock::new(Some(idle), None).unwrap();
        Watched::wrap(body, clock, stats, watchdog)
    }

    async fn cut_within(body: &mut ProxyBody, within: Duration) -> bool {
        tokio::time::sleep(within).await;
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)));
        matches!(polled.await, Poll::Ready(Some(Err(_))))
    }

    /// One watchdog task per connection: it cuts every stream that stays
    /// idle, ends once nothing is left to watch, and the next stream
    /// starts it again.
    #[tokio::test]
    async fn one_watchdog_cuts_each_idle_stream_and_restarts() {
        let watchdog = Watchdog::default();
        let mut a = watched(&watchdog, 100 * MS);
        let mut b = watched(&watchdog, 100 * MS);
        assert!(cut_within(&mut a, 200 * MS).await, "first stream not cut");
        assert!(cut_within(&mut b, MS).await, "second stream not cut");
        // Nothing left: the task has ended.
        tokio::time::sleep(50 * MS).await;
        assert!(lock_registry(&watchdog.registry).next.is_none());
        let mut c = watched(&watchdog, 100 * MS);
        assert!(cut_within(&mut c, 200 * MS).await, "a later stream not cut");
        // A stream with a shorter timeout (a reload) is cut on its own
        // deadline, not the one the task was sleeping for.
        let _long = watched(&watchdog, 10_000 * MS);
        let mut short = watched(&watchdog, 100 * MS);
        assert!(
            cut_within(&mut short, 300 * MS).await,
            "shorter timeout missed"
        );
    }

    #[test]
    fn no_deadline_no_clock() {
        assert!(StreamClock::new(None, None).is_none());
    }
}
