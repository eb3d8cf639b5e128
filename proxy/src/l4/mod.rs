//! L4 (TCP) proxying: one accepted connection, routed by where it was going
//! (destination port, network) or the TLS server name it asks for, copied
//! both ways to an endpoint of the route's cluster.
//!
//! Serves `protocol = "tcp"` listeners and, on capture listeners, every
//! connection detection did not take for HTTP (opaque TCP, TLS passed
//! through by SNI). Runs on the worker that accepted the connection, one
//! task per connection, with a snapshot load at its start and one after
//! the network filters' wait for the first bytes (none is held while a
//! client may keep it waiting); nothing here takes a lock.
//!
//! Routing: the first route whose `match` holds (`port`, `cidr`, `sni`)
//! wins; on a capture listener a connection no route claims goes to its
//! original destination (the built-in `passthrough` cluster, which routes
//! may also name). TLS is never terminated: the ClientHello is peeked, not
//! read, only when some route matches by `sni`.
//!
//! Upstream: the cluster's circuit breaker (`limits.max_requests` caps
//! concurrent connections) and balancer pick an endpoint (source IP is the
//! hash key for `ring_hash`/`maglev`); a refused or timed-out connect is an
//! outlier failure and another endpoint is tried, up to [`CONNECT_TRIES`].
//! The connect counts as the try's latency (peak EWMA), not the whole
//! connection.
//!
//! mTLS between sidecars for opaque TCP: a `tcp` listener with `tls`
//! terminates it (its `client_ca` and `allow` list of SPIFFE IDs decide who
//! may connect; `sni` routes see the handshake's server name), and a route
//! to a cluster with `tls` originates it (client certificate, CA,
//! `expect_identity`, as HTTP to that cluster does). Without them TLS
//! passes through untouched, routed by the peeked ClientHello; a cluster's
//! `tls` is never put around it (TLS in TLS), nor applied on capture
//! listeners, whose L4 bytes go on as the app sent them.
//!
//! A listener's `pipeline` names Proxy-Wasm network filters
//! (`filter::network`): they see the connection open and the client's
//! first chunk *before* the upstream connect (so a filter that refuses a
//! connection leaves the upstream without one). Only a filter that paused
//! in `proxy_on_new_connection` makes the connect wait for the client's
//! first bytes; otherwise the first chunk is what the client has already
//! sent and the connect is immediate. Then they see every chunk
//! each way (and may rewrite, hold or close), and both ends.
//!
//! A connection ends when both sides have closed (half-close is passed on),
//! at `limits.tcp_idle_timeout`, or when the listener's drain timeout
//! passes; the serve loop's drain waits for it before that. Failures close
//! the client's connection (there is no response to carry `x-wasp-error`):
//! they are counted in `wasp_proxy_errors_total` with their code and logged
//! once; every proxied connection has one access log line at its end, with
//! the bytes moved each way even when it ended in an error (`end="reset"`
//! and `error="<side>: <what>"`).

pub use crate::route::TcpMatch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::capture::detect::Detection;
use crate::capture::relay::{relay_tapped, Peer, RelayEnd, Tapped};
use crate::errors::ErrorCode;
use crate::filter::network::{Closed, NetVerdict, NetworkFilters, Side};
use crate::route::PASSTHROUGH;
use crate::snapshot::Snapshots;
use crate::tls::{ClientTls, UpstreamTlsError};
use crate::upstream::balance::PickContext;
use crate::upstream::{Admission, Upstream, WorkerPools, PASSTHROUGH_CONNECT_TIMEOUT};

/// The most of the client's first chunk read before connecting upstream
/// (the relay's own chunk size).
const FIRST_CHUNK: usize = 16 * 1024;

/// Endpoints tried per connection when connecting fails.
pub const CONNECT_TRIES: usize = 3;

/// "No idle timeout": far enough not to matter, near enough for `Instant`.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// One accepted connection handed to L4.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Where the client meant to connect: its original destination when
    /// captured, else the listener's own address.
    pub dst: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    /// The ClientHello's server name when detection already read it.
    pub sni: Option<String>,
    /// Whether the first bytes were already looked at (capture detection).
    pub sniffed: bool,
}

/// A connection's byte stream either side: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a connection ended before its upstream connect.
enum Early {
    /// A network filter closed it (or failed): counted under its code.
    Filter(Closed),
    /// The client's side: it reset, sent nothing in time while a filter
    /// waited, or the drain deadline passed. Not a proxy error: logged with
    /// this end (`reset`, `idle_timeout`, `drained`) as the relay would.
    Client(RelayEnd),
}

/// Why a connection was not proxied.
struct Refused {
    code: ErrorCode,
    why: String,
}

/// Proxies one connection to its end, on the worker that accepted it
/// (`pools` are that worker's). `close` is the listener's "drain deadline
/// passed" signal.
pub async fn proxy(
    snapshots: &Snapshots,
    pools: &WorkerPools,
    listener: Arc<str>,
    conn: Accepted,
    close: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let snapshot = snapshots.load_full();
    // The listener's settings (through `Deref`), TCP routes and series.
    let Some(cfg) = snapshot.listener(&listener) else {
        return;
    };
    let runtime = cfg;
    let mut sni = conn.sni.clone();
    // The client's own TLS, passed through (its ClientHello was peeked):
    // never wrapped in the cluster's TLS as well.
    let mut client_tls = false;
    // A listener with `tls` terminates it (mTLS between sidecars): the
    // routes see the handshake's server name, the allow list its peer.
    let (mut client, principal): (Box<dyn Io>, Option<Arc<str>>) = match cfg.tls.clone() {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.opaque_config());
            let limit = cfg.limits.header_timeout;
            let stream = match tokio::time::timeout(limit, acceptor.accept(conn.stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tls.handshake_failed(conn.peer, &e);
                    return;
                }
                Err(_) => {
                    tls.handshake_timed_out(conn.peer, limit);
                    return;
                }
            };
            runtime.stats.tls_handshakes.inc();
            let session = &stream.get_ref().1;
            sni = session.server_name().map(str::to_string);
            let principal = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::tls::CertFacts::parse(leaf).ok())
                .and_then(|facts| facts.identity().map(Arc::from));
            (Box::new(stream), principal)
        }
        None => {
            if !conn.sniffed && cfg.tcp_routes.iter().any(|r| r.matcher.wants_sni()) {
                if let Detection::Tls(hello) =
                    crate::capture::peek::sniff(&conn.stream, cfg.l4.detect_timeout).await
                {
                    sni = hello.sni;
                    client_tls = true;
                }
            }
            (Box::new(conn.stream), None)
        }
    };
    if let Some(allow) = &cfg.allow {
        if !allow.permits(principal.as_deref()) {
            runtime.stats.error(ErrorCode::UnauthorizedPeer);
            tracing::info!(
                listener = %listener,
                peer = %conn.peer,
                principal = principal.as_deref().unwrap_or("-"),
                code = ErrorCode::UnauthorizedPeer.as_str(),
                "tcp connection closed: the peer's identity is not on the listener's tls.allow"
            );
            return;
        }
    }
    let routed = cfg
        .tcp_routes
        .iter()
        .find(|r| r.matcher.matches(conn.dst, sni.as_deref()));
    let (route_name, cluster_id, stats) = match routed {
        Some(tcp) => {
            let c = tcp.route.pick_cluster(rand::random());
            let stats = tcp
                .stats
                .iter()
                .find(|(id, _)| *id == c)
                .map(|(_, s)| s.clone());
            (tcp.route.name.clone(), c, stats)
        }
        // Only a capture listener passes unclaimed connections on: a
        // `tcp` listener behind a host's own REDIRECT (443 -> 8443) would
        // otherwise dial the original destination and loop into itself.
        None if cfg.l4.capture.is_some() && conn.original_dst.is_some() => (
            Arc::from(crate::route::PASSTHROUGH_NAME),
            PASSTHROUGH,
            runtime.tcp_passthrough.clone(),
        ),
        None => {
            runtime.stats.error(ErrorCode::NoRoute);
            tracing::info!(
                listener = %listener,
                peer = %conn.peer,
                dst = %conn.dst,
                sni = sni.as_deref().unwrap_or("-"),
                code = ErrorCode::NoRoute.as_str(),
                "tcp connection closed: no route of the listener matches it"
            );
            return;
        }
    };
    // A capture listener's pipeline is HTTP filters, for its HTTP.
    let mut filters = (cfg.l4.is_tcp() && !cfg.pipeline.is_empty()).then(|| {
        let info = crate::filter::StreamInfo {
            listener: cfg.name.clone(),
            source: conn.peer,
            destination: conn.dst,
            scheme: "tcp",
            protocol: "TCP",
            request_id: Arc::from(""),
            start: std::time::SystemTime::now(),
            principal: principal.clone(),
            tls: None,
        };
        snapshot.filters.network(&cfg.pipeline, info)
    });
    // The filters decide before any upstream connection exists: a filter
    // that closes the connection here means the upstream never sees one.
    let mut first = Bytes::new();
    let generation = snapshot.generation;
    let cluster_name = snapshot.clusters.get(cluster_id).map(|c| c.name.clone());
    let listener_stats = runtime.stats.clone();
    // The first bytes a paused filter waits for get what a request head or
    // a TLS handshake gets (and no more than the idle timeout).
    let first_bytes = cfg
        .limits
        .header_timeout
        .min(cfg.l4.idle_timeout.unwrap_or(NEVER));
    // Not held while the filters may wait for the client: a reload
    // meanwhile must be able to let go of it; loaded again below.
    drop(snapshot);
    if let Some(f) = filters.as_mut() {
        let early = before_connect(f, &mut client, first_bytes, close.clone());
        match early.await {
            Ok(bytes) => first = bytes,
            Err(Early::Client(end)) => {
                if let Some(f) = filters.take() {
                    f.finish();
                }
                let error = match end {
                    RelayEnd::Failed { peer, kind } => format!("{}: {kind}", peer.as_str()),
                    _ => String::from("-"),
                };
                tracing::info!(
                    listener = %listener,
                    peer = %conn.peer,
                    dst = %conn.dst,
                    sni = sni.as_deref().unwrap_or("-"),
                    route = %route_name,
                    upstream = "-",
                    to_upstream = 0u64,
                    to_client = 0u64,
                    duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                    end = end.as_str(),
                    error = error.as_str(),
                    "tcp connection"
                );
                return;
            }
            Err(Early::Filter(closed)) => {
                let code = if closed.failed {
                    ErrorCode::FilterFailed
                } else {
                    ErrorCode::FilterClosedStream
                };
                listener_stats.error(code);
                tracing::info!(
                    listener = %listener,
                    peer = %conn.peer,
                    dst = %conn.dst,
                    route = %route_name,
                    code = code.as_str(),
                    "tcp connection closed before connecting upstream: {}", closed.why
                );
                return;
            }
        }
    }
    // The generation now serving: after a reload during the wait, the
    // route's cluster is looked up again by name (a listener or cluster
    // the reload removed ends the connection).
    let snapshot = snapshots.load_full();
    let Some(cfg) = snapshot.listener(&listener) else {
        return;
    };
    let runtime = cfg;
    let cluster_id = match cluster_name {
        Some(name) if snapshot.generation != generation => match snapshot.cluster_id(&name) {
            Some(id) => id,
            None => {
                runtime.stats.error(ErrorCode::UnknownCluster);
                return;
            }
        },
        _ => cluster_id,
    };
    // Looked up only now: a connection waiting for its first bytes holds
    // no upstream pools of its generation.
    let upstreams = pools.upstreams(snapshot.generation, &snapshot.clusters);
    let Some(upstream) = upstreams.get(cluster_id) else {
        runtime.stats.error(ErrorCode::UnknownCluster);
        return;
    };
    let connected = connect(upstream, cluster_id, conn.peer, conn.original_dst).await;
    let (server, addr, _admission) = match connected {
        Ok(c) => c,
        Err(refused) => {
            runtime.stats.error(refused.code);
            tracing::info!(
                listener = %listener,
                peer = %conn.peer,
                dst = %conn.dst,
                route = %route_name,
                cluster = %upstream.name,
                code = refused.code.as_str(),
                "tcp connection closed: {}", refused.why
            );
            return;
        }
    };
    // A cluster with `tls` gets the bytes over TLS (its client certificate,
    // CA and expected identity, as HTTP to it would), from a `tcp`
    // listener only, and never around the client's own TLS: a capture
    // listener passes the app's bytes (opaque or TLS routed by SNI) on as
    // the app sent them, and a ClientHello routed by `sni` wrapped again
    // would be TLS in TLS that no server reads.
    let originate = cfg.l4.is_tcp() && !client_tls && !conn.sniffed;
    let cluster_tls = snapshot
        .clusters
        .get(cluster_id)
        .and_then(|c| c.tls.clone())
        .filter(|_| originate);
    let mut server: Box<dyn Io> = match cluster_tls {
        None => Box::new(server),
        Some(tls) => match upstream_tls(&tls, server, addr, upstream.connect_timeout()).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                tls.handshake_failed(e.code);
                runtime.stats.error(ErrorCode::UpstreamTls);
                tracing::info!(
                    listener = %listener,
                    peer = %conn.peer,
                    route = %route_name,
                    upstream = %addr,
                    code = ErrorCode::UpstreamTls.as_str(),
                    reason = e.code,
                    "tcp connection closed: TLS to the upstream failed: {}", e.detail
                );
                return;
            }
        },
    };
    // The first chunk the filters already passed goes first, under the
    // relay's own bounds: an upstream that does not take it within the
    // idle timeout, or still has not when the drain deadline passes, ends
    // the connection as the relay would.
    let mut first_sent = 0u64;
    let idle = cfg.l4.idle_timeout.unwrap_or(NEVER);
    if !first.is_empty() {
        let written = tokio::select! {
            r = tokio::time::timeout(idle, server.write_all(&first)) => r.map_err(|_| RelayEnd::Idle),
            () = crate::lifecycle::drain_deadline_passed(close.clone()) => Err(RelayEnd::Stopped),
        };
        let failed = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(end) => Some(Ok(end)),
        };
        match failed {
            None => {}
            Some(Err(e)) => {
                runtime.stats.error(ErrorCode::UpstreamReset);
                tracing::info!(
                    listener = %listener,
                    peer = %conn.peer,
                    route = %route_name,
                    upstream = %addr,
                    code = ErrorCode::UpstreamReset.as_str(),
                    "tcp connection closed: writing the client's first bytes upstream: {e}"
                );
                return;
            }
            Some(Ok(end)) => {
                tracing::info!(
                    listener = %listener,
                    peer = %conn.peer,
                    dst = %conn.dst,
                    sni = sni.as_deref().unwrap_or("-"),
                    route = %route_name,
                    upstream = %addr,
                    to_upstream = 0u64,
                    to_client = 0u64,
                    duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                    end = end.as_str(),
                    error = "upstream: did not take the client's first bytes",
                    "tcp connection"
                );
                return;
            }
        }
        first_sent = first.len() as u64;
        if let Some(s) = &stats {
            s.to_upstream.inc_by(first_sent);
        }
    }
    if let Some(s) = &stats {
        s.connections.inc();
        s.open.inc();
    }
    // The snapshot is not held while bytes flow (a reload must be able to
    // let go of it); the series are cheap clones.
    drop(upstreams);
    drop(snapshot);
    let (up, down) = (
        stats.as_ref().map(|s| s.to_upstream.clone()),
        stats.as_ref().map(|s| s.to_downstream.clone()),
    );
    // Both directions run in this one task and call the filters only
    // synchronously, so this lock is never contended; it is here because
    // the task must be `Send`.
    let filters = std::sync::Mutex::new(filters);
    let tap = |side: Side| {
        let filters = &filters;
        move |chunk: &[u8], eos: bool| {
            let Ok(mut guard) = filters.lock() else {
                return Tapped::Close;
            };
            let Some(f) = guard.as_mut() else {
                return Tapped::Pass;
            };
            let verdict = f.data(side, chunk, eos);
            if eos {
                f.side_closed(side);
            }
            match verdict {
                NetVerdict::Forward(b) => Tapped::Replace(b),
                NetVerdict::Hold => Tapped::Hold,
                NetVerdict::Close(closed) => {
                    tracing::debug!(why = %closed.why, "a network filter closed the connection");
                    Tapped::Close
                }
            }
        }
    };
    let relayed = relay_tapped(
        client,
        server,
        idle,
        crate::lifecycle::drain_deadline_passed(close),
        (
            |n| {
                if let Some(c) = &up {
                    c.inc_by(n);
                }
            },
            |n| {
                if let Some(c) = &down {
                    c.inc_by(n);
                }
            },
        ),
        (tap(Side::Downstream), tap(Side::Upstream)),
    )
    .await;
    if let Some(f) = filters.into_inner().ok().flatten() {
        f.finish();
    }
    let elapsed = start.elapsed();
    if let Some(s) = &stats {
        s.open.dec();
        s.duration.observe_secs(elapsed.as_secs_f64());
    }
    // A relay that failed (a reset mid-copy) still counts what it moved;
    // the log names the error and the side it came from.
    let error = match relayed.end {
        RelayEnd::Failed { peer, kind } => format!("{}: {kind}", peer.as_str()),
        _ => String::from("-"),
    };
    tracing::info!(
        listener = %listener,
        peer = %conn.peer,
        dst = %conn.dst,
        sni = sni.as_deref().unwrap_or("-"),
        route = %route_name,
        upstream = %addr,
        to_upstream = relayed.to_upstream.saturating_add(first_sent),
        to_client = relayed.to_client,
        duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        end = relayed.end.as_str(),
        error = error.as_str(),
        "tcp connection"
    );
}

/// Runs `proxy_on_new_connection`, then the client's first chunk through
/// the filters, before the upstream connect. Only a filter that paused in
/// `proxy_on_new_connection` makes the connect wait for the client's first
/// bytes, up to `first_bytes` (the listener's `header_timeout`, at most its
/// `tcp_idle_timeout`): a client silent that long, or still silent when
/// the drain deadline passes, is closed without a connect; otherwise the bytes already queued are the
/// first chunk (none when the client has not sent yet) and the connect
/// happens at once, as Envoy connects unless a filter asks to receive
/// first. Answers the bytes to send upstream first (empty when none, or
/// when the filters hold them).
async fn before_connect(
    filters: &mut NetworkFilters,
    client: &mut Box<dyn Io>,
    first_bytes: Duration,
    close: watch::Receiver<bool>,
) -> Result<Bytes, Early> {
    let paused = filters.new_connection().await.map_err(Early::Filter)?;
    let mut buf = vec![0u8; FIRST_CHUNK];
    let read = async {
        if paused {
            tokio::select! {
                r = tokio::time::timeout(first_bytes, client.read(&mut buf)) => match r {
                    Ok(read) => Some(read),
                    Err(_) => return Err(Early::Client(RelayEnd::Idle)),
                },
                () = crate::lifecycle::drain_deadline_passed(close) => {
                    return Err(Early::Client(RelayEnd::Stopped));
                }
            }
        } else {
            // No filter asked to wait: only what the client has already
            // sent goes through them first, and the connect happens now
            // (a server that speaks first is not kept waiting). Later
            // bytes reach the filters through the relay.
            queued(client, &mut buf).await
        }
        .map_or(Ok(None), |r| {
            r.map(Some).map_err(|e| {
                Early::Client(RelayEnd::Failed {
                    peer: Peer::Client,
                    kind: e.kind(),
                })
            })
        })
    };
    let n = match read.await? {
        // Nothing queued yet (no filter waits for it); or ended before
        // sending: the relay sees (and passes on) the end.
        None | Some(0) => return Ok(Bytes::new()),
        Some(n) => n,
    };
    match filters.data(Side::Downstream, buf.get(..n).unwrap_or_default(), false) {
        NetVerdict::Forward(b) => Ok(b),
        NetVerdict::Hold => Ok(Bytes::new()),
        NetVerdict::Close(closed) => Err(Early::Filter(closed)),
    }
}

/// What `wasp check` and start-up warn about on `tcp` listeners with
/// `tls`: who can get in. Without `client_ca` any client that completes a
/// handshake is proxied; with it but no `allow`, any identity the CA signed
/// is. (Every allowed identity reaches every route of the listener.)
pub fn access_warnings(config: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    for l in config.listeners.iter().filter(|l| l.l4.is_tcp()) {
        let Some(tls) = &l.tls else { continue };
        if !tls.requires_client_cert() {
            out.push(format!(
                "listener \"{}\": tcp with tls but no tls.client_ca: any client that completes a handshake is proxied (no client certificate is asked for); set client_ca and allow to admit only given SPIFFE IDs",
                l.name
            ));
        } else if l.allow.is_none() {
            out.push(format!(
                "listener \"{}\": tcp with tls.client_ca but no tls.allow: any identity the CA signed is proxied to every route; list the SPIFFE IDs that may connect in tls.allow",
                l.name
            ));
        }
    }
    out
}

/// What the client has already sent (at most `buf`), without waiting:
/// `None` when nothing is queued yet.
async fn queued(client: &mut Box<dyn Io>, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
    let mut read = tokio::io::ReadBuf::new(buf);
    let polled = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *client).poll_read(cx, &mut read))
    })
    .await;
    match polled {
        std::task::Poll::Ready(Ok(())) => Some(Ok(read.filled().len())),
        std::task::Poll::Ready(Err(e)) => Some(Err(e)),
        std::task::Poll::Pending => None,
    }
}

/// Connects to the route's cluster: an endpoint the balancer picks (trying
/// others when connecting fails), or the original destination for
/// `passthrough`.
async fn connect(
    upstream: &Upstream,
    cluster_id: usize,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
) -> Result<(TcpStream, SocketAddr, Option<Admission>), Refused> {
    if cluster_id == PASSTHROUGH {
        let Some(dst) = original_dst else {
            return Err(Refused {
                code: ErrorCode::NoEndpoint,
                why: "the passthrough cluster needs a captured connection (it has no original destination)".into(),
            });
        };
        let stream = dial(dst, PASSTHROUGH_CONNECT_TIMEOUT)
            .await
            .map_err(|why| Refused {
                code: ErrorCode::UpstreamConnect,
                why: format!("connecting to the original destination {dst}: {why}"),
            })?;
        return Ok((stream, dst, None));
    }
    let Some(mut admission) = upstream.admit() else {
        return Err(Refused {
            code: ErrorCode::Overflow,
            why: format!(
                "cluster \"{}\" is at its limits.max_requests (concurrent connections at L4)",
                upstream.name
            ),
        });
    };
    let mut key_buf = [0u8; 16];
    let no_headers = http::HeaderMap::new();
    let hash_key = upstream
        .state
        .hash_key(&no_headers, peer.ip(), &mut key_buf);
    let ctx = PickContext { hash_key };
    let mut avoid = None;
    let mut last = String::new();
    for attempt in 0..CONNECT_TRIES {
        let picked = if attempt == 0 {
            upstream.pick_first(&ctx).await
        } else {
            upstream.pick(&ctx, avoid)
        };
        let Some(picked) = picked else {
            break;
        };
        let addr = picked.addr;
        if attempt > 0 && Some(addr) == avoid {
            // The only endpoint left is the one that just failed.
            break;
        }
        let mut try_ = upstream.start(picked);
        match dial(addr, upstream.connect_timeout()).await {
            Ok(stream) => {
                try_.succeeded();
                admission.headers_received();
                return Ok((stream, addr, Some(admission)));
            }
            Err(why) => {
                try_.failed();
                last = format!("connecting to {addr}: {why}");
                avoid = Some(addr);
            }
        }
    }
    if avoid.is_none() {
        return Err(Refused {
            code: ErrorCode::NoEndpoint,
            why: format!("cluster \"{}\" has no healthy endpoint", upstream.name),
        });
    }
    Err(Refused {
        code: ErrorCode::UpstreamConnect,
        why: last,
    })
}

/// TLS to an upstream over an open connection, bounded by `limit`: the
/// cluster's client certificate, CA and `expect_identity` (checked by its
/// verifier), the name from `tls.sni` or else the endpoint's address.
async fn upstream_tls(
    tls: &ClientTls,
    tcp: TcpStream,
    addr: SocketAddr,
    limit: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamTlsError> {
    let name = tls.server_name(&addr.ip().to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls.opaque_config());
    match tokio::time::timeout(limit, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(UpstreamTlsError {
            code: crate::tls::reason(&e),
            detail: crate::tls::describe(&e),
        }),
        Err(_) => Err(UpstreamTlsError {
            code: "timeout",
            detail: format!("no handshake within {limit:?}"),
        }),
    }
}

async fn dial(addr: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within connect_timeout ({limit:?})")),
    }
}
