//! Responses the proxy makes itself, and why.
//!
//! Every failure on the request path ends up as one [`ProxyError`]. It knows
//! its `x-wasp-error` code, status and one-line reason, so the response, the
//! log line and the error counter all say the same thing.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::upstream::ProxyBody;

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
}

/// Every `x-wasp-error` code counted in `wasp_proxy_errors_total`, in one
/// place: a [`ProxyError`]'s, the connection guard's (`header_timeout`,
/// `header_too_large`, `uri_too_long`) and the listener's `overflow`.
/// Metrics pre-resolve one counter per code from this list (a code missing
/// here is still counted, on a slower path).
pub const ERROR_CODES: [&str; 15] = [
    "no_route",
    "unknown_cluster",
    "no_endpoint",
    "upstream_connect",
    "upstream_timeout",
    "upstream_reset",
    "upstream_tls",
    "unauthorized_peer",
    "body_too_large",
    "bad_request",
    "body_timeout",
    "overflow",
    "header_timeout",
    "header_too_large",
    "uri_too_long",
];

impl ProxyError {
    /// The value of `x-wasp-error`: stable, documented, safe to alert on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "no_route",
            Self::UnknownCluster(_) => "unknown_cluster",
            Self::NoEndpoint(_) => "no_endpoint",
            Self::UpstreamConnect { .. } => "upstream_connect",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamReset { .. } => "upstream_reset",
            Self::UpstreamTls { .. } => "upstream_tls",
            Self::UnauthorizedPeer { .. } => "unauthorized_peer",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::Overflow(_) => "overflow",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::UnknownCluster(_) | Self::NoEndpoint(_) | Self::Overflow(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamConnect { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamTls { .. } => StatusCode::BAD_GATEWAY,
            Self::UnauthorizedPeer { .. } => StatusCode::FORBIDDEN,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        local_response(self.status(), self.code(), &self.to_string())
    }
}

/// A plain-text response made by the proxy, carrying `x-wasp-error`.
pub fn local_response(status: StatusCode, code: &'static str, reason: &str) -> Response<ProxyBody> {
    let body = format!("{reason}\n");
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-wasp-error", HeaderValue::from_static(code));
    resp
}
