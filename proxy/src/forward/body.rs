//! Body wrappers on the request path.
//!
//! [`RequestBody`] streams the client's body upstream frame by frame (no
//! buffering: backpressure comes from hyper polling it only as fast as the
//! upstream takes it), counts bytes, enforces the listener's size limit,
//! enforces the stream's deadlines while the client is the one to wait for,
//! and tags its errors as the client's fault so the error mapping can answer
//! 400/408/413 instead of blaming the upstream. Which bodies are read whole
//! first, so a retry can send them again, is decided here too
//! ([`should_keep_body`]). [`Tracked`] wraps any body and
//! runs a callback when it is dropped, which is when hyper is done with it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use tokio::time::Sleep;

use super::deadline::{Cut, StreamClock};
use super::error::ProxyError;
use crate::upstream::BoxError;

/// The client's request body failed: too large, or malformed on the wire.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamBodyError {
    #[error("request body is larger than the listener's limit of {0} bytes")]
    TooLarge(u64),
    #[error("invalid request body: {0}")]
    Invalid(#[source] BoxError),
    /// The client stopped sending (`stream_idle_timeout`) or was too slow
    /// overall (`request_timeout`).
    #[error("{0}")]
    Cut(Cut),
}

impl DownstreamBodyError {
    pub fn to_proxy_error(&self) -> ProxyError {
        match self {
            Self::TooLarge(limit) => ProxyError::BodyTooLarge { limit: *limit },
            Self::Invalid(e) => ProxyError::BadRequest(format!("invalid request body: {e}")),
            Self::Cut(cut) => ProxyError::Cut(*cut),
        }
    }
}

/// Request bodies up to this size are kept for retries.
pub(super) const REPLAY_LIMIT: u64 = 64 << 10;

/// Whether to read the request body whole before the first try, so it
/// can be sent again: the route retries, the body is declared small, and
/// no filter reads it (filters see the body as it streams).
pub(super) fn should_keep_body(
    policy: Option<&crate::upstream::RetryPolicy>,
    parts: &http::request::Parts,
    empty: bool,
    upgrade: bool,
    filtered: bool,
) -> bool {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    policy.is_some_and(|p| p.attempts > 0)
        && !empty
        && !upgrade
        && !filtered
        && declared.is_some_and(|n| n <= REPLAY_LIMIT)
}

/// The error to answer when reading a kept body failed.
pub(super) fn body_error(err: &(dyn std::error::Error + 'static)) -> ProxyError {
    match crate::upstream::find_cause::<DownstreamBodyError>(err) {
        Some(d) => d.to_proxy_error(),
        None => ProxyError::BadRequest(format!("cannot read the request body: {err}")),
    }
}

pin_project_lite::pin_project! {
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
        // The stream's deadlines (see `deadline`), when the listener has any.
        clock: Option<Arc<StreamClock>>,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B: Body> RequestBody<B> {
    pub fn new(inner: B, limit: u64, clock: Option<Arc<StreamClock>>) -> Self {
        if inner.is_end_stream() {
            if let Some(c) = &clock {
                c.received();
            }
        }
        Self {
            inner,
            seen: 0,
            limit,
            clock,
            timer: None,
        }
    }
}

impl<B> Body for RequestBody<B>
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
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(clock) = this.clock.as_deref() {
            match &polled {
                Poll::Pending => {
                    if let Poll::Ready(cut) = clock.poll_expired(this.timer, cx) {
                        return Poll::Ready(Some(Err(DownstreamBodyError::Cut(cut).into())));
                    }
                }
                Poll::Ready(None) => clock.received(),
                // A body with a known length ends with its last frame: the
                // client is not polled again to say so.
                Poll::Ready(Some(_)) if this.inner.is_end_stream() => clock.received(),
                Poll::Ready(Some(_)) => clock.touch(),
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        return Poll::Ready(Some(Err(
                            DownstreamBodyError::TooLarge(*this.limit).into()
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(DownstreamBodyError::Invalid(e.into()).into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Calls `on_drop` with the number of data bytes that passed through.
    pub struct Tracked<B, F: FnOnce(u64)> {
        #[pin]
        inner: B,
        bytes: u64,
        on_drop: Option<F>,
    }

    impl<B, F: FnOnce(u64)> PinnedDrop for Tracked<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_drop.take() {
                f(*this.bytes);
            }
        }
    }
}

impl<B, F: FnOnce(u64)> Tracked<B, F> {
    pub fn new(inner: B, on_drop: F) -> Self {
        Self {
            inner,
            bytes: 0,
            on_drop: Some(on_drop),
        }
    }
}

impl<B, F> Body for Tracked<B, F>
where
    B: Body<Data = Bytes>,
    F: FnOnce(u64),
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                *this.bytes += d.len() as u64;
            }
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
