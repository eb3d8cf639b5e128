//! gRPC callouts: `proxy_grpc_call` (unary), `proxy_grpc_stream`,
//! `proxy_grpc_send`, `proxy_grpc_close` and `proxy_grpc_cancel`, and the
//! task that carries one call or stream over HTTP/2 to a named cluster
//! (through [`HttpCallouts::open`](crate::filter::HttpCallouts::open), so
//! the cluster's circuit breakers, balancing and outlier detection apply).
//!
//! Host functions run inside a host call on the VM's thread and never
//! await: they check the guest's arguments and budgets, build the request,
//! keep a [`GrpcHandle`] in the VM's [`Host`] and record a
//! [`NewCallout`]; the caller spawns its [`GrpcTask`] after the callback.
//! The task reports [`GrpcEvent`]s back to the VM in order, as
//! `proxy_on_grpc_receive_initial_metadata`, `proxy_on_grpc_receive`,
//! `proxy_on_grpc_receive_trailing_metadata` and `proxy_on_grpc_close`
//! (a unary call: one `receive` on success, else one `close`, as Envoy).
//!
//! Budgets: each open call or stream holds one of the filter's
//! `limits.callouts` slots until it ends; request messages count against
//! the filter's callout bytes in flight until the connection takes them;
//! one message either way is at most [`MAX_MESSAGE`] (gRPC's default).
//! Statuses are the ones the Rust SDK accepts per call: INTERNAL_FAILURE or
//! PARSE_FAILURE for a call or stream that cannot start, NOT_FOUND or
//! BAD_ARGUMENT for send/close/cancel.
//!
//! A call or stream made by an HTTP stream's context is cancelled when that
//! stream ends (as Envoy cancels a context's outstanding requests); after
//! `proxy_grpc_cancel` the guest hears nothing more about the token.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, TE};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use wasmtime::Caller;

use super::headers::{deserialize, serialized_bound, MapError};
use super::http_call::{InFlight, CALLOUT_BYTES_IN_FLIGHT, DEFAULT_TIMEOUT, MAX_CLUSTER_NAME};
use super::memory::{self, HostResult};
use super::{note_limit, Status};
use crate::filter::host::{CalloutAnswer, CalloutWork, Host, NewCallout};
use crate::filter::metrics::Limit;
use crate::filter::{StreamBody, StreamError, StreamFuture};

/// Largest gRPC message sent or received (gRPC's default receive limit).
pub(crate) const MAX_MESSAGE: usize = 4 << 20;

/// Message bytes a stream may have received but not yet delivered to the
/// guest (one whole message always fits). Past it the task stops reading,
/// so HTTP/2 flow control holds the server back until the guest catches up.
pub(crate) const UNDELIVERED: usize = 2 * MAX_MESSAGE;

/// What one received message costs of [`UNDELIVERED`] besides its bytes,
/// so that a flood of empty messages is bounded too.
const MESSAGE_COST: usize = 64;

/// The share of [`UNDELIVERED`], and of the filter's callout bytes in
/// flight ([`CALLOUT_BYTES_IN_FLIGHT`], shared with `http_call` bodies), a
/// received message holds until the guest has it (dropped when its callback
/// is made, or with the event).
pub(crate) type Credit = Option<(OwnedSemaphorePermit, InFlight)>;

/// Longest service or method name read from the guest.
const MAX_NAME: usize = 1024;

/// gRPC status codes the host reports itself.
pub(crate) mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// One thing a gRPC call or stream reports to the guest.
#[derive(Debug)]
pub(crate) enum GrpcEvent {
    InitialMetadata(Vec<(String, Vec<u8>)>),
    Message(Bytes),
    TrailingMetadata(Vec<(String, Vec<u8>)>),
    Close { status: u32, message: String },
}

/// Which guest callback an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrpcCallback {
    InitialMetadata,
    Receive,
    TrailingMetadata,
    Close,
}

impl GrpcEvent {
    /// The callback, its last argument (entries, size or status) and what
    /// the guest may read during it.
    pub(crate) fn into_callback(self) -> (GrpcCallback, u32, CalloutAnswer) {
        match self {
            GrpcEvent::InitialMetadata(headers) => (
                GrpcCallback::InitialMetadata,
                headers.len() as u32,
                CalloutAnswer {
                    headers,
                    ..CalloutAnswer::default()
                },
            ),
            GrpcEvent::Message(body) => (
                GrpcCallback::Receive,
                body.len() as u32,
                CalloutAnswer {
                    body,
                    ..CalloutAnswer::default()
                },
            ),
            GrpcEvent::TrailingMetadata(trailers) => (
                GrpcCallback::TrailingMetadata,
                trailers.len() as u32,
                CalloutAnswer {
                    trailers,
                    ..CalloutAnswer::default()
                },
            ),
            GrpcEvent::Close { status, message } => (
                GrpcCallback::Close,
                status,
                CalloutAnswer {
                    status,
                    message,
                    ..CalloutAnswer::default()
                },
            ),
        }
    }
}

/// What the guest queues on a stream: a message (with the bytes it holds
/// of the budget) or its half-close. A channel closed without `End` is a
/// cancel (or the VM went away): the stream is reset, not ended.
pub(crate) enum Outgoing {
    Message(Bytes, InFlight),
    End,
}

/// The guest's side of an open call or stream (kept in [`Host::grpc`]).
pub(crate) struct GrpcHandle {
    /// Context that opened it.
    context: u32,
    /// Request messages of a stream; `None` for a call or once half-closed.
    send: Option<mpsc::UnboundedSender<Outgoing>>,
    unary: bool,
    /// Dropping it cancels the task (also when the VM goes away).
    _cancel: oneshot::Sender<()>,
}

/// One call or stream, spawned after the callback that opened it.
pub(crate) struct GrpcTask {
    open: StreamFuture,
    cancel: oneshot::Receiver<()>,
    unary: bool,
    timeout: Option<Duration>,
    /// The `limits.callouts` slot (and a call's message bytes), held until the end.
    _slots: (InFlight, Option<InFlight>),
    /// The filter, whose callout bytes in flight received stream messages
    /// count against until the guest has them.
    plugin: Arc<crate::filter::plugin::PluginShared>,
    /// Dropped when the task ends: a stream's request body then fails.
    _over: Option<oneshot::Sender<()>>,
}

/// Request body of a stream: the messages `proxy_grpc_send` queues; ends
/// when the guest half-closes. Once its task is over (cancelled, its HTTP
/// stream gone, or the exchange done) it fails, so the stream is reset
/// rather than left half open.
struct Outbound {
    messages: mpsc::UnboundedReceiver<Outgoing>,
    task_over: oneshot::Receiver<()>,
}

impl Body for Outbound {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = self.get_mut();
        if Pin::new(&mut this.task_over).poll(cx).is_ready() {
            return Poll::Ready(Some(Err("gRPC stream over".into())));
        }
        // The budget is given back as the connection takes the bytes.
        this.messages.poll_recv(cx).map(|m| match m {
            Some(Outgoing::Message(bytes, _budget)) => Some(Ok(Frame::data(bytes))),
            Some(Outgoing::End) => None,
            None => Some(Err("gRPC stream cancelled".into())),
        })
    }
}

/// A message with gRPC's length prefix (uncompressed).
fn framed(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(message.len().saturating_add(5));
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    b.freeze()
}

/// What the guest passed to `proxy_grpc_call` / `proxy_grpc_stream`.
struct Open {
    cluster: String,
    service: String,
    method: String,
    metadata: Vec<(String, Vec<u8>)>,
}

/// Reads and checks the arguments common to calls and streams.
#[allow(clippy::too_many_arguments)]
fn read_open(
    c: &mut Caller<'_, Host>,
    up: i32,
    ul: i32,
    sp: i32,
    sl: i32,
    mp: i32,
    ml: i32,
    hp: i32,
    hl: i32,
) -> Result<Open, Status> {
    let limits = c.data().plugin.limits.clone();
    let max_map = serialized_bound(limits.headers, limits.header_bytes);
    let cluster = read_name(c, up, ul, MAX_CLUSTER_NAME)?;
    let service = read_name(c, sp, sl, MAX_NAME)?;
    let method = read_name(c, mp, ml, MAX_NAME)?;
    let metadata = match memory::read_at_most(c, hp, hl, max_map)? {
        Some(bytes) => match deserialize(&bytes, limits.headers) {
            Ok(m) => m,
            Err(MapError::Malformed) => return Err(Status::ParseFailure),
            Err(MapError::TooMany) => return Err(too_much_metadata(c)),
        },
        None => return Err(too_much_metadata(c)),
    };
    Ok(Open {
        cluster,
        service,
        method,
        metadata,
    })
}

/// A UTF-8 name of at most `max` bytes.
fn read_name(c: &mut Caller<'_, Host>, p: i32, l: i32, max: usize) -> Result<String, Status> {
    memory::read_at_most(c, p, l, max)?
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(Status::ParseFailure)
}

fn too_much_metadata(c: &Caller<'_, Host>) -> Status {
    let limits = &c.data().plugin.limits;
    let detail = format!(
        "gRPC metadata over {} entries or {} bytes",
        limits.headers, limits.header_bytes
    );
    note_limit(c, Limit::Headers, &detail);
    Status::ParseFailure
}

/// The HTTP/2 request of a call or stream. Metadata the protocol owns
/// (pseudo headers, `content-type`, `te`, `grpc-timeout`) is the host's.
fn request(
    open: &Open,
    timeout: Option<Duration>,
    body: StreamBody,
) -> Result<Request<StreamBody>, Status> {
    let path = format!("/{}/{}", open.service, open.method);
    let mut b = Request::builder()
        .method(Method::POST)
        .version(Version::HTTP_2)
        .uri(path)
        // Envoy's gRPC client names the cluster as the authority too.
        .header(http::header::HOST, open.cluster.as_str())
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", grpc_timeout(t));
    }
    for (k, v) in &open.metadata {
        let k = k.to_ascii_lowercase();
        if k.starts_with(':')
            || matches!(k.as_str(), "content-type" | "te" | "grpc-timeout" | "host")
        {
            continue;
        }
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            (Ok(n), Ok(v)) => b = b.header(n, v),
            _ => return Err(Status::ParseFailure),
        }
    }
    b.body(body).map_err(|_| Status::ParseFailure)
}

/// A `grpc-timeout` value: at most 8 digits (gRPC over HTTP/2), so a
/// long timeout switches to a coarser unit (rounded up), as Envoy does.
fn grpc_timeout(t: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let ms = t.as_millis();
    let mut v = ms;
    for (unit, per) in [("m", 1u128), ("S", 1_000), ("M", 60_000), ("H", 3_600_000)] {
        v = ms.div_ceil(per);
        if v <= MAX {
            return format!("{v}{unit}");
        }
    }
    format!("{}H", v.min(MAX))
}

/// Takes a callout slot, opens the exchange and records the task. `Err`
/// is the status for the guest.
fn start(
    c: &mut Caller<'_, Host>,
    open: &Open,
    unary: Option<(Bytes, InFlight)>,
    timeout: Option<Duration>,
) -> Result<u32, Status> {
    let plugin = c.data().plugin.clone();
    let Some(slot) = InFlight::take(&plugin.callouts_in_flight, 1, plugin.limits.callouts) else {
        let detail = format!(
            "more than {} callouts (http_call and gRPC) of this filter in flight",
            plugin.limits.callouts
        );
        note_limit(c, Limit::Callouts, &detail);
        return Err(Status::InternalFailure);
    };
    let (send, body, bytes_slot, over) = match unary {
        Some((message, budget)) => {
            let body = Full::new(message)
                .map_err(|never| match never {})
                .boxed_unsync();
            (None, body, Some(budget), None)
        }
        None => {
            let (tx, messages) = mpsc::unbounded_channel();
            let (over, task_over) = oneshot::channel();
            let body = Outbound {
                messages,
                task_over,
            };
            (Some(tx), body.boxed_unsync(), None, Some(over))
        }
    };
    let req = request(open, timeout, body)?;
    let Some(future) = plugin.callouts.open(&open.cluster, req) else {
        tracing::debug!(filter = %plugin.name, cluster = open.cluster, "gRPC callout to an unknown cluster");
        return Err(Status::InternalFailure);
    };
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let h = c.data_mut();
    let token = h.next_token;
    h.next_token = h.next_token.wrapping_add(1).max(1);
    let context = h.effective;
    // A handle goes when its last event is delivered ([`wanted`]) or its
    // context is deleted ([`forget_context`]), never earlier: another
    // stream sharing this instance may still have its last event queued.
    let unary = send.is_none();
    h.grpc.insert(
        token,
        GrpcHandle {
            context,
            send,
            unary,
            _cancel: cancel_tx,
        },
    );
    let root = h.effective_root();
    h.callouts.push(NewCallout {
        token,
        context,
        root,
        timeout: timeout.unwrap_or(Duration::MAX),
        work: CalloutWork::Grpc(GrpcTask {
            open: future,
            cancel: cancel_rx,
            unary,
            timeout,
            _slots: (slot, bytes_slot),
            _over: over,
            plugin,
        }),
    });
    Ok(token)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn call(
    c: &mut Caller<'_, Host>,
    up: i32,
    ul: i32,
    sp: i32,
    sl: i32,
    mp: i32,
    ml: i32,
    hp: i32,
    hl: i32,
    msg_p: i32,
    msg_l: i32,
    timeout_ms: i32,
    token_out: i32,
) -> HostResult {
    let open = match read_open(c, up, ul, sp, sl, mp, ml, hp, hl) {
        Ok(o) => o,
        Err(s) => return Ok(s),
    };
    let message = match memory::read_at_most(c, msg_p, msg_l, MAX_MESSAGE) {
        Ok(Some(m)) => m,
        Ok(None) => {
            let detail = format!(
                "a gRPC message of {} bytes (max {MAX_MESSAGE})",
                msg_l as u32
            );
            note_limit(c, Limit::BodyBytes, &detail);
            return Ok(Status::InternalFailure);
        }
        Err(s) => return Ok(s),
    };
    let message = framed(&message);
    let Some(budget) = InFlight::take(
        &c.data().plugin.callout_bytes_in_flight,
        message.len(),
        CALLOUT_BYTES_IN_FLIGHT,
    ) else {
        let detail = format!(
            "more than {} MiB of callout bodies of this filter in flight",
            CALLOUT_BYTES_IN_FLIGHT >> 20
        );
        note_limit(c, Limit::Callouts, &detail);
        return Ok(Status::InternalFailure);
    };
    let timeout = match timeout_ms as u32 {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    match start(c, &open, Some((message, budget)), Some(timeout)) {
        Ok(token) => Ok(match memory::write_u32(c, token_out, token) {
            Ok(()) => Status::Ok,
            Err(s) => s,
        }),
        Err(s) => Ok(s),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn stream(
    c: &mut Caller<'_, Host>,
    up: i32,
    ul: i32,
    sp: i32,
    sl: i32,
    mp: i32,
    ml: i32,
    hp: i32,
    hl: i32,
    token_out: i32,
) -> HostResult {
    let open = match read_open(c, up, ul, sp, sl, mp, ml, hp, hl) {
        Ok(o) => o,
        Err(s) => return Ok(s),
    };
    match start(c, &open, None, None) {
        Ok(token) => Ok(match memory::write_u32(c, token_out, token) {
            Ok(()) => Status::Ok,
            Err(s) => s,
        }),
        Err(s) => Ok(s),
    }
}

/// `proxy_grpc_send`: queues one message on an open stream; `end_stream`
/// half-closes it after the message.
pub(crate) fn send(c: &mut Caller<'_, Host>, token: i32, p: i32, n: i32, end: i32) -> HostResult {
    let token = token as u32;
    match c.data().grpc.get(&token) {
        None => return Ok(Status::NotFound),
        Some(g) if g.unary => return Ok(Status::NotFound),
        // After the guest's own half-close: nothing more can be sent.
        Some(g) if g.send.is_none() => return Ok(Status::Ok),
        Some(_) => {}
    }
    let message = match memory::read_at_most(c, p, n, MAX_MESSAGE) {
        Ok(Some(m)) => m,
        Ok(None) => {
            let detail = format!("a gRPC message of {} bytes (max {MAX_MESSAGE})", n as u32);
            note_limit(c, Limit::BodyBytes, &detail);
            return Ok(Status::BadArgument);
        }
        Err(s) => return Ok(s),
    };
    // Every send is a message, even an empty one (as Envoy: the SDK's
    // `send_grpc_stream_message(token, None, true)` sends an empty message
    // and then half-closes).
    let message = framed(&message);
    let Some(budget) = InFlight::take(
        &c.data().plugin.callout_bytes_in_flight,
        message.len(),
        CALLOUT_BYTES_IN_FLIGHT,
    ) else {
        let detail = format!(
            "more than {} MiB of callout bodies of this filter in flight",
            CALLOUT_BYTES_IN_FLIGHT >> 20
        );
        note_limit(c, Limit::Callouts, &detail);
        return Ok(Status::BadArgument);
    };
    let Some(g) = c.data_mut().grpc.get_mut(&token) else {
        return Ok(Status::NotFound);
    };
    if let Some(tx) = g.send.as_ref() {
        // A stream the server already ended drops the message: its close
        // is on the way, and the SDK's trait methods trap on any status but OK.
        let _ = tx.send(Outgoing::Message(message, budget));
    }
    if end != 0 {
        half_close(g);
    }
    Ok(Status::Ok)
}

fn half_close(g: &mut GrpcHandle) {
    if let Some(tx) = g.send.take() {
        let _ = tx.send(Outgoing::End);
    }
}

/// `proxy_grpc_close`: half-closes a stream (the answer keeps coming);
/// on a unary call it is a cancel, as in Envoy.
pub(crate) fn close(c: &mut Caller<'_, Host>, token: i32) -> HostResult {
    let token = token as u32;
    let h = c.data_mut();
    match h.grpc.get_mut(&token) {
        None => Ok(Status::NotFound),
        Some(g) if g.unary => {
            h.grpc.remove(&token);
            Ok(Status::Ok)
        }
        Some(g) => {
            half_close(g);
            Ok(Status::Ok)
        }
    }
}

/// `proxy_grpc_cancel`: resets the call or stream; the guest hears nothing
/// more about it.
pub(crate) fn cancel(c: &mut Caller<'_, Host>, token: i32) -> HostResult {
    Ok(match c.data_mut().grpc.remove(&(token as u32)) {
        Some(_) => Status::Ok,
        None => Status::NotFound,
    })
}

/// Forgets (and so cancels) the calls and streams of a deleted context:
/// their last event can no longer reach it.
pub(crate) fn forget_context(h: &mut Host, context: u32) {
    h.grpc.retain(|_, g| g.context != context);
}

/// Whether the guest still wants events of `token` (not cancelled), and
/// forgets it after its last one.
pub(crate) fn wanted(h: &mut Host, token: u32, last: bool) -> bool {
    if last {
        h.grpc.remove(&token).is_some()
    } else {
        h.grpc.contains_key(&token)
    }
}

// ---- the task ---------------------------------------------------------------

/// Runs one call or stream to its end, reporting each event with whether
/// it is the last. Stops silently when `gone` resolves (the HTTP stream
/// that opened it ended: nobody is left to tell).
pub(crate) async fn run(
    task: GrpcTask,
    gone: impl Future<Output = ()>,
    emit: impl Fn(GrpcEvent, bool, Credit),
) {
    let GrpcTask {
        open,
        mut cancel,
        unary,
        timeout,
        _slots,
        _over,
        plugin,
    } = task;
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let credit = Arc::new(Semaphore::new(UNDELIVERED));
    let over_budget = |detail: &str| {
        plugin
            .stats
            .limit_exceeded(&plugin.name, Limit::Callouts, detail)
    };
    tokio::select! {
        end = exchange(
            open,
            unary,
            (&credit, &plugin.callout_bytes_in_flight),
            &emit,
            &over_budget,
        ) => {
            if let Some((status, message)) = end {
                emit(GrpcEvent::Close { status, message }, true, None);
            }
        }
        _ = &mut cancel => {
            // Not seen by the guest (its handle is gone); it tells a paused
            // stream that nothing more is coming from this token.
            emit(GrpcEvent::Close { status: code::CANCELLED, message: "cancelled".into() }, true, None);
        }
        _ = deadline => {
            let t = timeout.unwrap_or_default();
            emit(GrpcEvent::Close { status: code::DEADLINE_EXCEEDED, message: format!("gRPC call timed out after {t:?}") }, true, None);
        }
        () = gone => {}
    }
}

/// The exchange itself; `None` when a unary call's answer was reported,
/// else the closing status and message.
async fn exchange(
    open: StreamFuture,
    unary: bool,
    (credit, filter_bytes): (&Arc<Semaphore>, &Arc<std::sync::atomic::AtomicUsize>),
    emit: &impl Fn(GrpcEvent, bool, Credit),
    over_budget: &impl Fn(&str),
) -> Option<(u32, String)> {
    let resp = match open.await {
        Ok(r) => r,
        Err(e) => return Some((code::UNAVAILABLE, e)),
    };
    let (parts, mut body) = resp.into_parts();
    if parts.status != StatusCode::OK {
        return Some((
            from_http(parts.status),
            format!("gRPC answer with HTTP status {}", parts.status.as_u16()),
        ));
    }
    if parts.headers.contains_key("grpc-status") {
        // Trailers-Only: the status came with the headers.
        if !unary {
            emit(
                GrpcEvent::TrailingMetadata(pairs(&parts.headers)),
                false,
                None,
            );
            return Some(closing(&parts.headers));
        }
        return Some(match closing(&parts.headers) {
            // A unary call's OK needs its message (as in the body's case).
            (code::OK, _) => (code::INTERNAL, "no message answered a unary call".into()),
            other => other,
        });
    }
    if !unary {
        emit(
            GrpcEvent::InitialMetadata(pairs(&parts.headers)),
            false,
            None,
        );
    }
    let mut buf = BytesMut::new();
    let mut reply: Option<Bytes> = None;
    loop {
        let frame = match body.frame().await {
            None => {
                return Some((
                    code::UNKNOWN,
                    "gRPC answer ended without grpc-status".into(),
                ))
            }
            Some(Err(e)) => return Some((code::UNAVAILABLE, format!("gRPC answer broken: {e}"))),
            Some(Ok(f)) => f,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                buf.extend_from_slice(&data);
                loop {
                    match next_message(&mut buf) {
                        Ok(Some(m)) if unary => {
                            if reply.replace(m).is_some() {
                                return Some((
                                    code::INTERNAL,
                                    "more than one message answered a unary call".into(),
                                ));
                            }
                        }
                        Ok(Some(m)) => {
                            // Waits (reading nothing more) while the
                            // guest has not taken enough of what came.
                            let cost = m.len().saturating_add(MESSAGE_COST).min(UNDELIVERED);
                            let permit = match u32::try_from(cost) {
                                Ok(n) => credit.clone().acquire_many_owned(n).await.ok(),
                                Err(_) => None,
                            };
                            // The filter's own budget, shared by all its
                            // callouts: undelivered stream messages may fill
                            // it only up to STREAM_SHARE (so slow streams
                            // cannot starve the filter's http_calls); past
                            // it the stream ends rather than pinning more
                            // memory for a guest that does not keep up.
                            let Some(bytes) = InFlight::take(filter_bytes, cost, STREAM_SHARE)
                            else {
                                let detail = format!(
                                    "more than {} MiB of callout bodies of this filter in flight (undelivered gRPC stream messages may use {} MiB of it)",
                                    CALLOUT_BYTES_IN_FLIGHT >> 20,
                                    STREAM_SHARE >> 20
                                );
                                over_budget(&detail);
                                return Some((code::RESOURCE_EXHAUSTED, detail));
                            };
                            emit(GrpcEvent::Message(m), false, permit.map(|p| (p, bytes)))
                        }
                        Ok(None) => break,
                        Err(e) => return Some(e),
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            continue;
        };
        if !unary {
            emit(GrpcEvent::TrailingMetadata(pairs(&trailers)), false, None);
            return Some(closing(&trailers));
        }
        let (status, message) = closing(&trailers);
        return match (status, reply) {
            (code::OK, Some(m)) => {
                emit(GrpcEvent::Message(m), true, None);
                None
            }
            (code::OK, None) => Some((code::INTERNAL, "no message answered a unary call".into())),
            (status, _) => Some((status, message)),
        };
    }
}

/// How far undelivered gRPC stream messages may fill the filter's
/// [`CALLOUT_BYTES_IN_FLIGHT`]: half, the other half stays for its
/// `http_call` bodies and request messages.
const STREAM_SHARE: usize = CALLOUT_BYTES_IN_FLIGHT / 2;

/// Takes one whole message off `buf`, if there is one.
fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, (u32, String)> {
    let prefix = buf.get(1..5).and_then(|s| <[u8; 4]>::try_from(s).ok());
    let (Some(&flag), Some(len)) = (buf.first(), prefix) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err((
            code::RESOURCE_EXHAUSTED,
            format!("gRPC message of {len} bytes (max {MAX_MESSAGE})"),
        ));
    }
    if flag != 0 {
        return Err((
            code::INTERNAL,
            "compressed gRPC message (no grpc-encoding was offered)".into(),
        ));
    }
    if buf.len() < len.saturating_add(5) {
        return Ok(None);
    }
    let _prefix = buf.split_to(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// `grpc-status` (UNKNOWN if missing) and the decoded `grpc-message` of
/// trailers or of a Trailers-Only head.
fn closing(h: &HeaderMap) -> (u32, String) {
    let status = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(code::UNKNOWN);
    let message = h
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    (status, message)
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while let Some(&b) = v.get(i) {
        let hex = v
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// gRPC's mapping of HTTP statuses of a non-gRPC answer.
pub(crate) fn from_http(s: StatusCode) -> u32 {
    match s.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

fn pairs(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_their_prefix() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&framed(b"one"));
        buf.extend_from_slice(&framed(b""));
        buf.extend_from_slice(&framed(b"three")[..4]);
        assert_eq!(next_message(&mut buf), Ok(Some(Bytes::from_static(b"one"))));
        assert_eq!(next_message(&mut buf), Ok(Some(Bytes::new())));
        assert_eq!(next_message(&mut buf), Ok(None), "partial prefix waits");
        buf.extend_from_slice(&framed(b"three")[4..]);
        assert_eq!(
            next_message(&mut buf),
            Ok(Some(Bytes::from_static(b"three")))
        );
        let mut huge = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            next_message(&mut huge).map_err(|e| e.0),
            Err(code::RESOURCE_EXHAUSTED)
        );
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 1, 7][..]);
        assert_eq!(
            next_message(&mut compressed).map_err(|e| e.0),
            Err(code::INTERNAL)
        );
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(
            percent_decode(b"no%20such%20thing%ZZ%"),
            "no such thing%ZZ%"
        );
        assert_eq!(percent_decode(b"caf%C3%A9"), "café");
        assert_eq!(percent_decode(b"%+1x"), "%+1x", "a sign is no hex digit");
    }

    #[test]
    fn grpc_status_is_digits_only() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("+0"));
        assert_eq!(closing(&h).0, code::UNKNOWN);
        h.insert("grpc-status", HeaderValue::from_static("7"));
        assert_eq!(closing(&h).0, code::PERMISSION_DENIED);
    }

    #[test]
    fn long_grpc_timeouts_switch_units() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_millis(99_999_999)), "99999999m");
        assert_eq!(grpc_timeout(Duration::from_millis(100_000_000)), "100000S");
        let week = Duration::from_secs(7 * 86_400 * 1_000_000);
        assert!(grpc_timeout(week).len() <= 9, "{}", grpc_timeout(week));
        assert_eq!(grpc_timeout(Duration::MAX), "99999999H");
    }

    fn answer(headers: &[(&'static str, &'static str)], body: StreamBody) -> StreamFuture {
        let mut r = http::Response::new(body);
        for (k, v) in headers {
            r.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        Box::pin(async move { Ok(r) })
    }

    #[tokio::test]
    async fn unary_trailers_only_ok_without_message_is_internal() {
        let open = answer(
            &[("grpc-status", "0")],
            http_body_util::Empty::new()
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        let sem = Arc::new(Semaphore::new(UNDELIVERED));
        let bytes = Arc::default();
        let end = exchange(open, true, (&sem, &bytes), &|_, _, _| {}, &|_| {}).await;
        assert_eq!(end.map(|e| e.0), Some(code::INTERNAL));
    }

    /// A server that never stops sending, yielding between messages.
    struct Flood(bool);

    impl Body for Flood {
        type Data = Bytes;
        type Error = StreamError;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
            let this = self.get_mut();
            this.0 = !this.0;
            if this.0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(Frame::data(framed(&[7u8; 1000])))))
        }
    }

    #[tokio::test]
    async fn undelivered_messages_are_bounded() {
        let open = answer(&[], Flood(false).boxed_unsync());
        let sem = Arc::new(Semaphore::new(UNDELIVERED));
        let got = std::sync::Mutex::new(Vec::new());
        let emit = |e, _, credit| got.lock().unwrap().push((e, credit));
        let bytes = Arc::default();
        let run = exchange(open, false, (&sem, &bytes), &emit, &|_| {});
        tokio::pin!(run);
        let bound = UNDELIVERED / (1000 + MESSAGE_COST) + 2;
        let r = tokio::time::timeout(Duration::from_millis(300), &mut run).await;
        assert!(r.is_err(), "the flood never ends");
        let held = got.lock().unwrap().len();
        assert!(held <= bound, "{held} events held (bound {bound})");
        assert!(held > bound / 2, "reading stopped early: {held}");
        // The guest takes them: reading goes on.
        got.lock().unwrap().clear();
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut run).await;
        assert!(got.lock().unwrap().len() > bound / 2);
    }

    #[tokio::test]
    async fn undelivered_messages_count_against_the_filter_budget() {
        let open = answer(&[], Flood(false).boxed_unsync());
        let sem = Arc::new(Semaphore::new(UNDELIVERED));
        // The filter's other callouts hold all but a few bytes of the
        // streams' share of its budget.
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(STREAM_SHARE - 3000));
        let got = std::sync::Mutex::new(Vec::new());
        let emit = |e, _, credit| got.lock().unwrap().push((e, credit));
        let over = std::sync::atomic::AtomicUsize::new(0);
        let noted = |_: &str| {
            over.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(open, false, (&sem, &bytes), &emit, &noted),
        )
        .await
        .expect("the stream ends at the filter's budget");
        assert_eq!(end.map(|e| e.0), Some(code::RESOURCE_EXHAUSTED));
        assert_eq!(over.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Two messages fitted; delivering them gives their bytes back.
        let messages = got
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| matches!(e, GrpcEvent::Message(_)))
            .count();
        assert_eq!(messages, 2);
        got.lock().unwrap().clear();
        assert_eq!(
            bytes.load(std::sync::atomic::Ordering::Relaxed),
            STREAM_SHARE - 3000
        );
    }

    /// Streams whose guest does not keep up stop at half the filter's
    /// budget: its http_calls still get the other half.
    #[tokio::test]
    async fn slow_streams_leave_half_the_budget_to_http_calls() {
        let open = answer(&[], Flood(false).boxed_unsync());
        let sem = Arc::new(Semaphore::new(UNDELIVERED));
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(STREAM_SHARE));
        let got = std::sync::Mutex::new(Vec::new());
        let emit = |e, _, credit| got.lock().unwrap().push((e, credit));
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(open, false, (&sem, &bytes), &emit, &|_| {}),
        )
        .await
        .expect("the stream ends at its share");
        assert_eq!(end.map(|e| e.0), Some(code::RESOURCE_EXHAUSTED));
        assert!(got
            .lock()
            .unwrap()
            .iter()
            .all(|(e, _)| !matches!(e, GrpcEvent::Message(_))));
        let call = InFlight::take(&bytes, 8 << 20, CALLOUT_BYTES_IN_FLIGHT);
        assert!(call.is_some(), "an http_call body still fits");
    }
}
