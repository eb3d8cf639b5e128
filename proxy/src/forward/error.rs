//! Responses the proxy makes itself, and why.
//!
//! Every failure on the request path ends up as one [`ProxyError`]. It knows
//! its [`ErrorCode`] (which decides the status) and one-line reason, so the
//! response, the log line and the error counter all say the same thing;
//! the response itself is rendered by [`crate::errors`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::body::DownstreamBodyError;
use crate::errors::ErrorCode;
use crate::upstream::{find_cause, ProxyBody, SendError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route on listener \"{listener}\" matches host \"{host}\" and path \"{path}\"")]
    NoRoute {
        listener: String,
        host: String,
        path: String,
    },
    #[error("cluster \"{0}\" is not configured")]
    UnknownCluster(String),
    #[error("a filter moved the request to route \"{route}\", whose filters did not run on it ({missing}); the filters that run are chosen from the route the client's request matched")]
    RerouteDenied { route: String, missing: String },
    #[error("a filter picked cluster \"{cluster}\" (wasp.cluster), but the filters of the routes that send there did not run on the request ({missing})")]
    ClusterDenied { cluster: String, missing: String },
    #[error("cluster \"{0}\" has no endpoint to send to")]
    NoEndpoint(String),
    #[error("cannot connect to {addr} in cluster \"{cluster}\": {reason}")]
    UpstreamConnect {
        cluster: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("{addr} in cluster \"{cluster}\" did not answer within {after:?}")]
    UpstreamTimeout {
        cluster: String,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("{addr} in cluster \"{cluster}\" closed or reset the connection: {reason}")]
    UpstreamReset {
        cluster: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("TLS with {addr} in cluster \"{cluster}\" failed: {reason}")]
    UpstreamTls {
        cluster: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("peer {} may not call {scope}", principal.as_deref().unwrap_or("without a client certificate"))]
    UnauthorizedPeer {
        /// `listener "x"` or `route "y"`.
        scope: String,
        principal: Option<std::sync::Arc<str>>,
    },
    #[error("request body is larger than the listener's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the request body did not arrive within {after:?}")]
    BodyTimeout { after: Duration },
    #[error("{0}")]
    Overflow(String),
    /// A stream deadline passed before the response started.
    #[error("{0}")]
    Cut(super::deadline::Cut),
}

/// A failed try, as the client hears of it. `upstream` decided whose
/// fault it was; a request body that failed is answered as the client's
/// fault when it was (too large, malformed, too slow).
impl From<SendError> for ProxyError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Connect {
                cluster,
                addr,
                reason,
            } => Self::UpstreamConnect {
                cluster: cluster.to_string(),
                addr,
                reason,
            },
            SendError::Timeout {
                cluster,
                addr,
                after,
            } => Self::UpstreamTimeout {
                cluster: cluster.to_string(),
                addr,
                after,
            },
            SendError::Reset {
                cluster,
                addr,
                reason,
            } => Self::UpstreamReset {
                cluster: cluster.to_string(),
                addr,
                reason,
            },
            SendError::Tls {
                cluster,
                addr,
                reason,
            } => Self::UpstreamTls {
                cluster: cluster.to_string(),
                addr,
                reason,
            },
            e @ SendError::Overflow { .. } => Self::Overflow(e.to_string()),
            SendError::Body {
                cluster,
                addr,
                reason,
                source,
            } => match find_cause::<DownstreamBodyError>(&*source) {
                Some(d) => d.to_proxy_error(),
                // A filter's answer mid-body (its answer replaces this one).
                None => Self::UpstreamReset {
                    cluster: cluster.to_string(),
                    addr,
                    reason,
                },
            },
            e @ SendError::Address { .. } => Self::BadRequest(e.to_string()),
        }
    }
}

impl ProxyError {
    /// Its `x-wasp-error` code, which also decides the status.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NoRoute { .. } => ErrorCode::NoRoute,
            Self::UnknownCluster(_) => ErrorCode::UnknownCluster,
            Self::RerouteDenied { .. } | Self::ClusterDenied { .. } => ErrorCode::RerouteDenied,
            Self::NoEndpoint(_) => ErrorCode::NoEndpoint,
            Self::UpstreamConnect { .. } => ErrorCode::UpstreamConnect,
            Self::UpstreamTimeout { .. } => ErrorCode::UpstreamTimeout,
            Self::UpstreamReset { .. } => ErrorCode::UpstreamReset,
            Self::UpstreamTls { .. } => ErrorCode::UpstreamTls,
            Self::UnauthorizedPeer { .. } => ErrorCode::UnauthorizedPeer,
            Self::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::BodyTimeout { .. } => ErrorCode::BodyTimeout,
            Self::Overflow(_) => ErrorCode::Overflow,
            Self::Cut(cut) => cut.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        local_response(self.code(), &self.to_string())
    }
}

/// A response made by the proxy (see [`ErrorCode::response`]), with
/// forward's body type.
pub fn local_response(code: ErrorCode, reason: &str) -> Response<ProxyBody> {
    boxed(code.response(reason))
}

/// A whole-body response (a proxy-made or a filter's local one) with
/// forward's body type.
pub(super) fn boxed(resp: Response<Bytes>) -> Response<ProxyBody> {
    resp.map(|body| {
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync()
    })
}
