//! One try at one endpoint ([`Upstream::send_once`]) and why it failed
//! ([`SendError`]), for proxied requests (`forward`, through the retry loop
//! in [`super::retry`]) and filter callouts alike.
//!
//! A try points the request at the picked endpoint, counts it in flight
//! (an [`super::Attempt`]), waits at most its per-try timeout, and decides
//! here whose fault a failure was: the endpoint's (connect, reset, TLS,
//! timeout: a verdict for outlier detection), the cluster's limits
//! (overflow, counted here), or the request's own body (the sender's side:
//! no verdict on the endpoint). The body reports its own failure to the
//! try ([`SendBody`]), as hyper's HTTP/2 client would report it as a reset
//! by the endpoint. Callers only map a [`SendError`] to their answer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};

use super::pool::{PoolError, ResponseBody};
use super::{BoxError, ConnectionOverflow, Picked, ProxyBody, Upstream};

/// Why a try failed. The messages are the ones clients and logs see.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {addr} in cluster \"{cluster}\": {reason}")]
    Connect {
        cluster: Arc<str>,
        addr: SocketAddr,
        reason: String,
    },
    #[error("{addr} in cluster \"{cluster}\" did not answer within {after:?}")]
    Timeout {
        cluster: Arc<str>,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("{addr} in cluster \"{cluster}\" closed or reset the connection: {reason}")]
    Reset {
        cluster: Arc<str>,
        addr: SocketAddr,
        reason: String,
    },
    #[error("TLS with {addr} in cluster \"{cluster}\" failed: {reason}")]
    Tls {
        cluster: Arc<str>,
        addr: SocketAddr,
        reason: String,
    },
    /// A new connection would pass the cluster's `limits.max_connections`.
    #[error("cluster \"{cluster}\": {source}")]
    Overflow {
        cluster: Arc<str>,
        source: ConnectionOverflow,
    },
    /// The request's own body failed while it was sent (too large, cut by
    /// a deadline, answered by a filter): not the endpoint's fault, and not
    /// retried. `source` is the body's own error.
    #[error("the request body to {addr} in cluster \"{cluster}\" failed: {reason}")]
    Body {
        cluster: Arc<str>,
        addr: SocketAddr,
        reason: String,
        source: BoxError,
    },
    /// The request could not be addressed to the endpoint.
    #[error("cannot address the request to {addr}: {reason}")]
    Address { addr: SocketAddr, reason: String },
}

impl SendError {
    /// Whether the failure says something about the endpoint (and so
    /// counts for outlier detection).
    pub fn blames_endpoint(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Reset { .. } | Self::Timeout { .. } | Self::Tls { .. }
        )
    }
}

/// What hyper is told when the request body fails; the body's own error
/// waits in the try's [`Failure`] slot.
#[derive(Debug, thiserror::Error)]
#[error("the request body failed")]
pub struct BodyFailed;

/// How a try ended without a response, before the verdict.
enum Failed {
    Client(PoolError),
    Elapsed(Duration),
}

/// Where a request body leaves its error for the try that sends it.
type Failure = Arc<Mutex<Option<BoxError>>>;

/// The request body as the client sends it. hyper's HTTP/2 client drops a
/// request body's error (it resets the stream and reports the reset, which
/// would blame the endpoint), so the body keeps its own error in a slot
/// the try reads before any verdict, the same way over HTTP/1 and HTTP/2.
/// Wrapping costs no second boxing; a body that is already over (nothing
/// to fail) gets no slot.
pub struct SendBody {
    inner: ProxyBody,
    failure: Option<Failure>,
}

impl SendBody {
    fn new(inner: ProxyBody) -> (Self, Option<Failure>) {
        let failure = (!inner.is_end_stream()).then(Failure::default);
        let body = Self {
            inner,
            failure: failure.clone(),
        };
        (body, failure)
    }
}

impl Body for SendBody {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                match self.failure.as_ref().map(|f| f.lock()) {
                    Some(Ok(mut slot)) => {
                        slot.get_or_insert(e);
                    }
                    _ => tracing::debug!(error = %e, "request body failed"),
                }
                Poll::Ready(Some(Err(BodyFailed)))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
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

/// The body's own error, if it failed.
fn take_failure(failure: Option<&Failure>) -> Option<BoxError> {
    failure?.lock().ok()?.take()
}

impl Upstream {
    /// One try of `req` at `picked`, within `per_try` if given. The
    /// request's URI is pointed at the endpoint (kept if it already names
    /// it). The try counts for load and latency whatever happens, and for
    /// outlier detection when the endpoint answered 5xx or is to blame;
    /// dropping the future cancels it (counted for load only).
    pub async fn send_once(
        &self,
        picked: Picked,
        req: Request<ProxyBody>,
        per_try: Option<Duration>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let addr = picked.addr;
        let authority = picked.authority();
        let req = point_at(req, authority).map_err(|reason| SendError::Address { addr, reason })?;
        let (parts, body) = req.into_parts();
        let (body, failure) = SendBody::new(body);
        let mut attempt = self.start(picked);
        let sent = self.pool.send(addr, Request::from_parts(parts, body));
        let outcome = match per_try {
            Some(after) => match tokio::time::timeout(after, sent).await {
                Ok(r) => r.map_err(Failed::Client),
                Err(_) => Err(Failed::Elapsed(after)),
            },
            None => sent.await.map_err(Failed::Client),
        };
        let result = outcome.map_err(|failed| match take_failure(failure.as_ref()) {
            // The body's own failure first, whatever hyper made of it.
            Some(source) => SendError::Body {
                cluster: self.name.clone(),
                addr,
                reason: error_chain(&*source),
                source,
            },
            None => match failed {
                Failed::Client(e) => self.classify(addr, e),
                Failed::Elapsed(after) => SendError::Timeout {
                    cluster: self.name.clone(),
                    addr,
                    after,
                },
            },
        });
        match &result {
            Ok(resp) if resp.status().is_server_error() => attempt.failed(),
            Ok(_) => attempt.succeeded(),
            Err(e) if e.blames_endpoint() => attempt.failed(),
            // The sender's fault or a local limit: no verdict on the endpoint.
            Err(_) => {}
        }
        result
    }

    /// Whose fault a failed try was.
    fn classify(&self, addr: SocketAddr, err: PoolError) -> SendError {
        let cluster = self.name.clone();
        let (err, connecting): (&(dyn std::error::Error + 'static), bool) = match &err {
            PoolError::Connect(e) => (&**e, true),
            PoolError::Send(e) => (e, false),
        };
        let reason = error_chain(err);
        // A body failure whose slot was not there to keep it (cannot
        // happen: only bodies already over go without one).
        if find_cause::<BodyFailed>(err).is_some() {
            return SendError::Body {
                cluster,
                addr,
                reason: reason.clone(),
                source: reason.into(),
            };
        }
        if let Some(o) = find_cause::<ConnectionOverflow>(err) {
            self.count_overflow();
            return SendError::Overflow {
                cluster,
                source: ConnectionOverflow(o.0),
            };
        }
        // A failed handshake, or a TLS alert after it (TLS 1.3 servers reject
        // a client certificate after the client thinks the handshake is done).
        if find_cause::<crate::tls::UpstreamTlsError>(err).is_some()
            || crate::tls::rustls_cause(err).is_some()
        {
            return SendError::Tls {
                cluster,
                addr,
                reason,
            };
        }
        if connecting {
            SendError::Connect {
                cluster,
                addr,
                reason,
            }
        } else {
            SendError::Reset {
                cluster,
                addr,
                reason,
            }
        }
    }

    /// Counts a request refused by the cluster's limits.
    pub(super) fn count_overflow(&self) {
        self.state
            .counters
            .overflows
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// `req` addressed to `authority` over plain `http` (TLS is the cluster's
/// setting, not the scheme's).
fn point_at(
    mut req: Request<ProxyBody>,
    authority: http::uri::Authority,
) -> Result<Request<ProxyBody>, String> {
    let uri = req.uri_mut();
    if uri.authority() != Some(&authority) || uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        let mut parts = std::mem::take(uri).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *uri = Uri::from_parts(parts).map_err(|e| e.to_string())?;
    }
    Ok(req)
}

/// The first error of type `E` in `err`'s cause chain.
pub fn find_cause<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// `err` and its causes on one line, without repeats.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Frame, Incoming};

    use super::*;
    use crate::upstream::balance::PickContext;
    use crate::upstream::{Cluster, ClusterState, Endpoint, Upstreams};

    fn upstreams(endpoint: SocketAddr) -> Upstreams {
        upstreams_over(endpoint, "http1")
    }

    fn upstreams_over(endpoint: SocketAddr, protocol: &str) -> Upstreams {
        upstreams_with(endpoint, protocol, "")
    }

    /// `extra`: more lines of the cluster's table.
    fn upstreams_with(endpoint: SocketAddr, protocol: &str, extra: &str) -> Upstreams {
        let toml = format!(
            "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:15006\"\n[[listeners.routes]]\nmatch = {{ prefix = \"/\" }}\ncluster = \"app\"\n[clusters.app]\nendpoints = [\"{endpoint}\"]\nprotocol = \"{protocol}\"\n{extra}"
        );
        let config = crate::config::parse(Path::new("/etc/wasp/wasp.toml"), &toml, |_| None)
            .unwrap_or_else(|p| panic!("test config: {p:?}"));
        // The cluster as `snapshot::compile` builds it, without the
        // dependency on the layer above.
        let clusters: Vec<Cluster> = config
            .clusters
            .iter()
            .map(|c| {
                let endpoints = vec![Endpoint {
                    addr: endpoint,
                    weight: 1,
                }];
                let state = ClusterState::new(c.name.clone(), c.settings.clone(), &endpoints, None);
                Cluster {
                    config: c.clone(),
                    endpoints,
                    tls: None,
                    state: std::sync::Arc::new(state),
                }
            })
            .collect();
        Upstreams::build(&clusters, &crate::telemetry::Metrics::new(), None)
    }

    fn failures(up: &Upstream) -> u64 {
        up.state
            .endpoints()
            .endpoints
            .iter()
            .map(|e| e.failures.load(Ordering::Relaxed))
            .sum()
    }

    fn request(body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.uri_mut() = Uri::from_static("/x");
        req
    }

    fn empty() -> ProxyBody {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn a_refused_connection_is_connect_and_blames_the_endpoint() {
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .unwrap();
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let err = up.send_once(picked, request(empty()), None).await.err();
        assert!(
            matches!(err, Some(SendError::Connect { addr: a, .. }) if a == addr),
            "{err:?}"
        );
        assert_eq!(failures(up), 1);
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out_per_try() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds the connection, never answering.
        let hold = tokio::spawn(async move {
            let conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let after = Duration::from_millis(100);
        let err = up
            .send_once(picked, request(empty()), Some(after))
            .await
            .err();
        assert!(
            matches!(err, Some(SendError::Timeout { after: t, .. }) if t == after),
            "{err:?}"
        );
        assert_eq!(failures(up), 1);
        hold.abort();
    }

    /// A body that fails on the way is the sender's side, whatever the
    /// endpoint did: classified here, no verdict on the endpoint.
    #[tokio::test]
    async fn a_failing_body_is_not_the_endpoints_fault() {
        failing_body_over(false).await;
    }

    /// hyper's HTTP/2 client drops the body's error and resets the stream:
    /// still the body's failure, not a reset by the endpoint.
    #[tokio::test]
    async fn a_failing_body_is_not_the_endpoints_fault_over_h2() {
        failing_body_over(true).await;
    }

    async fn failing_body_over(h2: bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                // Answers only a whole body; a broken one ends the request.
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    req.into_body().collect().await?;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
            }
        });
        let ups = upstreams_over(addr, if h2 { "http2" } else { "http1" });
        let up = ups.by_name("app").unwrap();
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"part"))),
            Err("the client went away".into()),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let mut req = request(body);
        *req.method_mut() = http::Method::POST;
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        let err = up.send_once(picked, req, None).await.err();
        match err {
            Some(SendError::Body { source, .. }) => {
                assert!(error_chain(&*source).contains("the client went away"));
            }
            other => panic!("h2={h2}: expected a body error, got {other:?}"),
        }
        assert_eq!(failures(up), 0);
    }

    /// An upstream that answers "ok" and counts the connections it took;
    /// `close_after_one` closes each connection after its first answer.
    async fn counting(
        h2: bool,
        close_after_one: bool,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, svc)
                        .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .keep_alive(!close_after_one)
                            .serve_connection(io, svc)
                            .await
                    };
                });
            }
        });
        (addr, accepted)
    }

    async fn get_ok(up: &Upstream) {
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let resp = up
            .send_once(picked, request(empty()), Some(Duration::from_secs(5)))
            .await;
        let body = resp
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    /// HTTP/1.1: a connection whose answer was read to the end carries the
    /// next request.
    #[tokio::test]
    async fn an_http1_connection_is_reused_once_its_answer_is_read() {
        let (addr, accepted) = counting(false, false).await;
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        for _ in 0..3 {
            get_ok(up).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Two at once need two connections; both are kept for later.
        tokio::join!(get_ok(up), get_ok(up));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        tokio::join!(get_ok(up), get_ok(up));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A connection the upstream closed while it sat idle is not used: the
    /// next request goes on a new one and succeeds.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let (addr, accepted) = counting(false, true).await;
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        for _ in 0..3 {
            get_ok(up).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(failures(up), 0);
    }

    /// HTTP/2: concurrent requests share one connection.
    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted) = counting(true, false).await;
        let ups = upstreams_over(addr, "http2");
        let up = ups.by_name("app").unwrap();
        get_ok(up).await;
        tokio::join!(get_ok(up), get_ok(up), get_ok(up), get_ok(up));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An upstream that answers 401 to every request as soon as its head
    /// is in, without reading the body, and keeps the connection open
    /// (reading and dropping whatever else comes); counts connections.
    async fn early_answer() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A connection answered before its request body was all sent cannot
    /// carry the next request yet: the next request must not wait behind
    /// that body (and time out, blaming a healthy endpoint) but go on
    /// another connection.
    #[tokio::test]
    async fn a_connection_still_sending_a_body_is_not_handed_out() {
        let (addr, accepted) = early_answer().await;
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        // Client A: one chunk, then its body stalls (kept open below).
        let (chunks, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        chunks
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
        let mut req = request(body);
        *req.method_mut() = http::Method::POST;
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let resp = up
            .send_once(picked, req, Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(resp.status(), http::StatusCode::UNAUTHORIZED);
        let _ = resp.into_body().collect().await.unwrap();
        // Client B, while A's body is still open.
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let resp = up
            .send_once(picked, request(empty()), Some(Duration::from_secs(2)))
            .await;
        assert!(
            matches!(&resp, Ok(r) if r.status() == http::StatusCode::UNAUTHORIZED),
            "{resp:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(failures(up), 0);
        drop(chunks);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    /// HTTP/2, cold: requests that come while the connection opens wait
    /// for that one handshake instead of each dialing.
    #[tokio::test]
    async fn concurrent_http2_requests_on_a_cold_cluster_share_one_handshake() {
        let (addr, accepted) = counting(true, false).await;
        let ups = upstreams_over(addr, "http2");
        let up = ups.by_name("app").unwrap();
        tokio::join!(
            get_ok(up),
            get_ok(up),
            get_ok(up),
            get_ok(up),
            get_ok(up),
            get_ok(up),
            get_ok(up),
            get_ok(up)
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// HTTP/2, cold, endpoint down: every waiting request gets the one
    /// connect failure (each blaming the endpoint), none hangs.
    #[tokio::test]
    async fn a_failed_http2_handshake_fails_every_waiting_request() {
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .unwrap();
        let ups = upstreams_over(addr, "http2");
        let up = ups.by_name("app").unwrap();
        let one = || async {
            let picked = up.pick(&PickContext::default(), None).unwrap();
            up.send_once(picked, request(empty()), Some(Duration::from_secs(5)))
                .await
                .err()
        };
        let (a, b, c) = tokio::join!(one(), one(), one());
        for err in [a, b, c] {
            assert!(matches!(err, Some(SendError::Connect { .. })), "{err:?}");
        }
        assert_eq!(failures(up), 3);
    }

    /// HTTP/2: a connection with nothing in flight for longer than
    /// `pool_idle_timeout` is closed (the sweep runs at least each second);
    /// the next request opens a new one.
    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
        let (addr, accepted) = counting(true, false).await;
        let ups = upstreams_with(addr, "http2", "pool_idle_timeout = \"100ms\"\n");
        let up = ups.by_name("app").unwrap();
        get_ok(up).await;
        get_ok(up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(2300)).await;
        get_ok(up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// HTTP/1.1: past `pool_idle_timeout` a kept connection is not reused;
    /// `pool_max_idle` bounds how many are kept.
    #[tokio::test]
    async fn http1_idle_expiry_and_max_idle() {
        let (addr, accepted) = counting(false, false).await;
        let ups = upstreams_with(
            addr,
            "http1",
            "pool_idle_timeout = \"100ms\"\npool_max_idle = 1\n",
        );
        let up = ups.by_name("app").unwrap();
        tokio::join!(get_ok(up), get_ok(up));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Only one of the two was kept.
        tokio::join!(get_ok(up), get_ok(up));
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(300)).await;
        get_ok(up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    /// A response whose body is dropped before its end closes its
    /// connection rather than pooling one with a half-read answer.
    #[tokio::test]
    async fn a_response_dropped_early_does_not_pool_its_connection() {
        let (addr, accepted) = counting(false, false).await;
        let ups = upstreams(addr);
        let up = ups.by_name("app").unwrap();
        let picked = up.pick(&PickContext::default(), None).unwrap();
        let resp = up
            .send_once(picked, request(empty()), Some(Duration::from_secs(5)))
            .await
            .unwrap();
        drop(resp);
        get_ok(up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// HTTP/2: an upstream that answers each connection's first request
    /// and then sends GOAWAY (graceful shutdown). The next request goes on
    /// a new connection, and the endpoint is not blamed.
    #[tokio::test]
    async fn a_request_after_goaway_opens_a_new_http2_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let answered = Arc::new(tokio::sync::Notify::new());
                    let notify = answered.clone();
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let notify = notify.clone();
                        async move {
                            notify.notify_one();
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = answered.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        let ups = upstreams_over(addr, "http2");
        let up = ups.by_name("app").unwrap();
        get_ok(up).await;
        // Lets the GOAWAY arrive: the case is a connection the upstream
        // has shut down, not a race with it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        get_ok(up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Right behind the second connection's GOAWAY: whichever
        // connection it meets, the request is answered.
        get_ok(up).await;
        assert_eq!(failures(up), 0);
    }
}
