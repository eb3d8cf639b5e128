//! The connector for upstream pools (module `pool`): TCP, then TLS when the cluster has
//! `tls`, counting connections as they open and close so `/metrics` can
//! show them per cluster.
//!
//! Runs on the worker that owns the pool. URIs stay `http://ip:port` even
//! for TLS clusters (the pool key is the endpoint either way); whether to
//! speak TLS is the cluster's setting, not the scheme's. The TLS handshake
//! is bounded by the cluster's `connect_timeout`. A failed handshake comes
//! back as [`UpstreamTlsError`], which `forward` turns into 502
//! `upstream_tls`.
//!
//! `limits.max_connections` is enforced here, across workers, by taking a
//! place in [`ClusterState::connections`] before dialling: checking the
//! open-connections gauge instead lets every request of a burst on a cold
//! pool pass, since none of their connections is open yet.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::ClusterState;
use crate::telemetry::UpstreamStats;
use crate::tls::{ClientTls, UpstreamConn, UpstreamTls, UpstreamTlsError};

#[derive(Clone, Debug)]
pub struct CountingConnector {
    inner: HttpConnector,
    stats: UpstreamStats,
    tls: Option<Arc<ClientTls>>,
    handshake_timeout: Duration,
    /// Circuit breaker: no new connection while the cluster has
    /// `limits.max_connections` connecting or open (all workers); the try
    /// fails with [`ConnectionOverflow`]. `None`: no limit, nothing counted.
    breaker: Option<(usize, Arc<ClusterState>)>,
}

/// A new connection was refused because the cluster is at its
/// `limits.max_connections`; `forward` answers 503 `overflow`.
#[derive(Debug, thiserror::Error)]
#[error("the cluster is at its limit of {0} open connections")]
pub struct ConnectionOverflow(pub usize);

/// A connection that decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct Counted {
    io: Io,
    /// What filters may read of this connection (`upstream.*`).
    info: Arc<UpstreamConn>,
    stats: UpstreamStats,
    /// Held for the connection's whole life, so closing it frees the place.
    _slot: Option<Slot>,
}

/// One place under `limits.max_connections`, given back on drop: when the
/// dial fails, is cancelled, or the connection it became closes.
#[derive(Debug)]
struct Slot(Arc<ClusterState>);

#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    /// Boxed: a rustls session is over a kilobyte, a TCP stream 40 bytes.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl CountingConnector {
    pub fn new(
        inner: HttpConnector,
        stats: UpstreamStats,
        tls: Option<Arc<ClientTls>>,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            stats,
            tls,
            handshake_timeout,
            breaker: None,
        }
    }

    /// Sets the `limits.max_connections` circuit breaker from `cluster`'s
    /// settings; its places are counted in `cluster`, shared by all workers.
    pub fn with_max_connections(mut self, cluster: &Arc<ClusterState>) -> Self {
        self.breaker = cluster
            .settings
            .limits
            .max_connections
            .map(|max| (max, cluster.clone()));
        self
    }
}

// === impl Slot ===

impl Slot {
    /// Takes a place if fewer than `max` are taken. A compare-and-swap, so
    /// concurrent dials on any worker can never take more than `max`.
    fn reserve(cluster: &Arc<ClusterState>, max: usize) -> Option<Self> {
        cluster
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(cluster.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// TLS over an open TCP connection, bounded by `limit`, and the facts
/// filters may read of it (worked out here, once per connection).
async fn handshake(
    tls: &ClientTls,
    host: &str,
    tcp: TcpStream,
    limit: Duration,
) -> Result<(TlsStream<TcpStream>, UpstreamTls), UpstreamTlsError> {
    let name = tls.server_name(host)?;
    let (config, local) = tls.config_and_local();
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(limit, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            let facts = UpstreamTls::of(stream.get_ref().1, local);
            Ok((stream, facts))
        }
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

impl tower_service::Service<Uri> for CountingConnector {
    type Response = Counted;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let slot = match &self.breaker {
            None => None,
            Some((max, cluster)) => match Slot::reserve(cluster, *max) {
                Some(slot) => Some(slot),
                None => {
                    let max = *max;
                    return Box::pin(
                        async move { Err(Box::new(ConnectionOverflow(max)) as BoxError) },
                    );
                }
            },
        };
        let host = uri.host().unwrap_or_default().to_string();
        let connecting = tower_service::Service::<Uri>::call(&mut self.inner, uri);
        let stats = self.stats.clone();
        let tls = self.tls.clone();
        let limit = self.handshake_timeout;
        Box::pin(async move {
            let tcp = connecting.await.map_err(BoxError::from)?;
            let local_address = tcp.inner().local_addr().ok();
            let (io, tls) = match tls {
                None => (Io::Plain(tcp), None),
                Some(tls) => match handshake(&tls, &host, tcp.into_inner(), limit).await {
                    Ok((stream, facts)) => (Io::Tls(Box::new(TokioIo::new(stream))), Some(facts)),
                    Err(e) => {
                        tls.handshake_failed(e.code);
                        return Err(Box::new(e) as BoxError);
                    }
                },
            };
            stats.opened.inc();
            stats.open.inc();
            Ok(Counted {
                io,
                info: Arc::new(UpstreamConn { local_address, tls }),
                stats,
                _slot: slot,
            })
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.stats.open.dec();
    }
}

impl Counted {
    /// What filters may read of this connection (`upstream.*`).
    pub fn info(&self) -> Arc<UpstreamConn> {
        self.info.clone()
    }
}

/// Calls the same method on whichever stream `$io` holds.
macro_rules! both {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Plain($s) => $e,
            Io::Tls($s) => $e,
        }
    };
}

impl Read for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        both!(&mut self.io, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl Write for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        both!(&mut self.io, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        both!(&mut self.io, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        both!(&mut self.io, io => Pin::new(io).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        both!(&self.io, io => io.is_write_vectored())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        both!(&mut self.io, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
}
