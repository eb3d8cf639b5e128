//! L4 (TCP) proxying: one accepted connection, routed by where it was going
//! (destination port, network) or the TLS server name it asks for, copied
//! both ways to an endpoint of the route's cluster.
//!
//! Serves `protocol = "tcp"` listeners and, on capture listeners, every
//! connection detection did not take for HTTP (opaque TCP, TLS passed
//! through by SNI). Runs on the worker that accepted the connection, one
//! task per connection, with one snapshot load at its start; nothing here
//! takes a lock.
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
//! connection. Cluster `tls` is not applied at L4 (bytes pass as they are).
//!
//! A listener's `pipeline` names Proxy-Wasm network filters
//! (`filter::network`): they see the connection open, every chunk each way
//! (and may rewrite, hold or close), and both ends.
//!
//! A connection ends when both sides have closed (half-close is passed on),
//! at `limits.tcp_idle_timeout`, or when the listener's drain timeout
//! passes; the serve loop's drain waits for it before that. Failures close
//! the client's connection (there is no response to carry `x-wasp-error`):
//! they are counted in `wasp_proxy_errors_total` with their code and logged
//! once; every proxied connection has one access log line at its end.

pub use crate::route::TcpMatch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::capture::detect::Detection;
use crate::capture::relay::{relay_tapped, RelayEnd, Tapped, CLOSED_BY_TAP};
use crate::errors::ErrorCode;
use crate::filter::network::{NetVerdict, Side};
use crate::route::PASSTHROUGH;
use crate::snapshot::Snapshots;
use crate::upstream::balance::PickContext;
use crate::upstream::{Admission, Upstream, WorkerPools, PASSTHROUGH_CONNECT_TIMEOUT};

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
    if !conn.sniffed && cfg.tcp_routes.iter().any(|r| r.matcher.wants_sni()) {
        if let Detection::Tls(hello) =
            crate::capture::peek::sniff(&conn.stream, cfg.l4.detect_timeout).await
        {
            sni = hello.sni;
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
    let upstreams = pools.upstreams(snapshot.generation, &snapshot.clusters);
    let Some(upstream) = upstreams.get(cluster_id) else {
        runtime.stats.error(ErrorCode::UnknownCluster);
        return;
    };
    let connected = connect(upstream, cluster_id, &conn).await;
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
            principal: None,
            tls: None,
        };
        snapshot.filters.network(&cfg.pipeline, info)
    });
    if let Some(f) = filters.as_mut() {
        if let Err(why) = f.new_connection().await {
            runtime.stats.error(ErrorCode::FilterFailed);
            tracing::info!(
                listener = %listener,
                peer = %conn.peer,
                route = %route_name,
                code = ErrorCode::FilterFailed.as_str(),
                "tcp connection closed: {why}"
            );
            return;
        }
    }
    if let Some(s) = &stats {
        s.connections.inc();
        s.open.inc();
    }
    let idle = cfg.l4.idle_timeout.unwrap_or(NEVER);
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
                NetVerdict::Close(why) => {
                    tracing::debug!(%why, "a network filter closed the connection");
                    Tapped::Close
                }
            }
        }
    };
    let relayed = relay_tapped(
        conn.stream,
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
    let (to_upstream, to_client, end) = match &relayed {
        Ok(r) => (
            r.to_upstream,
            r.to_client,
            match r.end {
                RelayEnd::Closed => "closed",
                RelayEnd::Idle => "idle_timeout",
                RelayEnd::Stopped => "drained",
            },
        ),
        Err(e) if e.kind() == CLOSED_BY_TAP => (0, 0, "filter_closed"),
        Err(_) => (0, 0, "reset"),
    };
    tracing::info!(
        listener = %listener,
        peer = %conn.peer,
        dst = %conn.dst,
        sni = sni.as_deref().unwrap_or("-"),
        route = %route_name,
        upstream = %addr,
        to_upstream,
        to_client,
        duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        end,
        "tcp connection"
    );
}

/// Connects to the route's cluster: an endpoint the balancer picks (trying
/// others when connecting fails), or the original destination for
/// `passthrough`.
async fn connect(
    upstream: &Upstream,
    cluster_id: usize,
    conn: &Accepted,
) -> Result<(TcpStream, SocketAddr, Option<Admission>), Refused> {
    if cluster_id == PASSTHROUGH {
        let Some(dst) = conn.original_dst else {
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
        .hash_key(&no_headers, conn.peer.ip(), &mut key_buf);
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
