//! The vocabulary of responses the proxy makes itself, and their one
//! renderer.
//!
//! Every answer wasp makes instead of forwarding (no route, an upstream
//! down, a filter failure, a head the guard refused, ...) has an
//! [`ErrorCode`]: its `x-wasp-error` value, its status and a description
//! for the docs. [`ErrorCode::response`] renders it for hyper (forward, the
//! filter engine) and [`ErrorCode::raw_http1`] as bytes for the places that
//! answer on a raw socket before hyper has a request (the connection guard,
//! the listener's overflow). So the header, content type and body shape are
//! decided here and nowhere else, and the metrics pre-resolve one counter
//! per code from [`ErrorCode::ALL`].
//!
//! A leaf: it depends on nothing else in the crate.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// The header every proxy-made response carries.
pub const HEADER: &str = "x-wasp-error";

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

macro_rules! codes {
    ($($variant:ident = $code:literal, $status:ident, $about:literal;)*) => {
        /// Why the proxy answered itself. The string form is stable and
        /// documented: safe to alert on.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(#[doc = $about] $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order (`code as usize` indexes it).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The `x-wasp-error` value.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The status the client gets.
            pub const fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }

            /// One line on what the code means, for docs and `wasp check`.
            pub const fn about(self) -> &'static str {
                match self { $(ErrorCode::$variant => $about,)* }
            }
        }
    };
}

codes! {
    NoRoute = "no_route", NOT_FOUND, "No route of the listener matches the request.";
    UnknownCluster = "unknown_cluster", SERVICE_UNAVAILABLE, "The route (or a filter) names a cluster that is not configured.";
    NoEndpoint = "no_endpoint", SERVICE_UNAVAILABLE, "The cluster has no healthy endpoint to send to.";
    UpstreamConnect = "upstream_connect", BAD_GATEWAY, "Connecting to the picked endpoint failed.";
    UpstreamTimeout = "upstream_timeout", GATEWAY_TIMEOUT, "The upstream did not answer within the route's timeout.";
    UpstreamReset = "upstream_reset", BAD_GATEWAY, "The upstream closed or reset the connection before answering.";
    UpstreamTls = "upstream_tls", BAD_GATEWAY, "The TLS handshake with the upstream failed.";
    UnauthorizedPeer = "unauthorized_peer", FORBIDDEN, "The peer's mTLS identity is not on the listener's or route's allow list.";
    BodyTooLarge = "body_too_large", PAYLOAD_TOO_LARGE, "The request body exceeds `max_body_bytes` (or a filter's buffer limit).";
    BadRequest = "bad_request", BAD_REQUEST, "The request is malformed (framing, Host, ...).";
    BodyTimeout = "body_timeout", REQUEST_TIMEOUT, "A request body that had to be read whole (or held for the filters) did not arrive in time.";
    Overflow = "overflow", SERVICE_UNAVAILABLE, "A connection or cluster limit is reached.";
    HeaderTimeout = "header_timeout", REQUEST_TIMEOUT, "The request head did not arrive within `header_timeout`.";
    HeaderTooLarge = "header_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE, "The request head exceeds `max_header_bytes`.";
    UriTooLong = "uri_too_long", URI_TOO_LONG, "The request target is too long.";
    FilterFailed = "filter_failed", SERVICE_UNAVAILABLE, "A filter with `fail = \"closed\"` failed (trap, deadline, memory, proc_exit).";
    FilterClosedStream = "filter_closed_stream", SERVICE_UNAVAILABLE, "A filter closed the stream.";
    ListenerRemoved = "listener_removed", SERVICE_UNAVAILABLE, "The request arrived on a listener a reload has just removed.";
    StreamIdleTimeout = "stream_idle_timeout", REQUEST_TIMEOUT, "No bytes moved either way on a request's stream for `stream_idle_timeout` (408 before the response started, else the stream is reset).";
    RequestTimeout = "request_timeout", REQUEST_TIMEOUT, "The whole request (head and body) did not arrive within `request_timeout`.";
    RerouteDenied = "reroute_denied", INTERNAL_SERVER_ERROR, "A filter changed the request so that it matched a route whose filters (or per-route filter configs) did not run on it.";
    ResponseTooLarge = "response_too_large", INTERNAL_SERVER_ERROR, "A response body a filter buffers (PAUSE) exceeds its limit while the response head is still wasp's (held for the filters, or a filter's local reply); Envoy's `response_payload_too_large`.";
    // Admin API answers: last, so the listener codes keep their indices.
    AdminForbidden = "admin_forbidden", FORBIDDEN, "The admin API refused the caller (not loopback, no or wrong token, browser-shaped request, or a Host that is not an IP or localhost).";
    AdminNotFound = "admin_not_found", NOT_FOUND, "No such admin endpoint (the probes address serves only /live, /ready and /metrics).";
    AdminMethodNotAllowed = "admin_method_not_allowed", METHOD_NOT_ALLOWED, "The admin endpoint exists but not with this method.";
    AdminBadRequest = "admin_bad_request", BAD_REQUEST, "The admin request's parameters are invalid (e.g. an unknown log level).";
    ReloadRejected = "reload_rejected", BAD_REQUEST, "`POST /reload` found the new configuration or a filter invalid; the previous one keeps serving (the body lists each problem with file:line:column).";
    AdminUnavailable = "admin_unavailable", SERVICE_UNAVAILABLE, "The admin action cannot run in this process now (reload not running yet, log level not adjustable).";
    AdminInternal = "admin_internal", INTERNAL_SERVER_ERROR, "The admin API could not render its answer.";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorCode {
    /// Whether the code answers traffic on a listener (and so has a
    /// per-listener series in `wasp_proxy_errors_total`), rather than an
    /// admin API caller. Listener codes come first in [`ErrorCode::ALL`].
    pub const fn on_listener(self) -> bool {
        !matches!(
            self,
            ErrorCode::AdminForbidden
                | ErrorCode::AdminNotFound
                | ErrorCode::AdminMethodNotAllowed
                | ErrorCode::AdminBadRequest
                | ErrorCode::ReloadRejected
                | ErrorCode::AdminUnavailable
                | ErrorCode::AdminInternal
        )
    }

    /// The code of hyper's own answer to a head it could not parse, by its
    /// status (what the connection guard labels).
    pub fn of_hyper_status(status: &[u8]) -> Option<ErrorCode> {
        match status {
            b"400" => Some(ErrorCode::BadRequest),
            b"431" => Some(ErrorCode::HeaderTooLarge),
            b"414" => Some(ErrorCode::UriTooLong),
            _ => None,
        }
    }

    /// The response: this code's status, `x-wasp-error`, and `reason` as a
    /// one-line plain-text body. `B` is whatever body type the caller
    /// sends (`Bytes`, or forward's boxed body via `From`). The code rides
    /// along as an extension, so whoever finally sends the response knows
    /// it is wasp's own and why, without reading the header back (a
    /// filter or an upstream may set that header too).
    pub fn response<B: From<Bytes>>(self, reason: &str) -> Response<B> {
        let mut resp = Response::new(B::from(Bytes::from(body(reason))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
        h.insert(HEADER, HeaderValue::from_static(self.as_str()));
        resp.extensions_mut().insert(self);
        resp
    }

    /// The code of a response [`Self::response`] made; `None` for any
    /// other (an upstream's, a filter's own).
    pub fn of_response<B>(resp: &Response<B>) -> Option<ErrorCode> {
        resp.extensions().get::<ErrorCode>().copied()
    }

    /// The same response as HTTP/1.1 bytes, for a raw socket the proxy
    /// closes right after (`connection: close`).
    pub fn raw_http1(self, reason: &str) -> Vec<u8> {
        let body = body(reason);
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\n{HEADER}: {}\r\ncontent-type: {TEXT_PLAIN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            self.as_str(),
            body.len(),
        )
        .into_bytes()
    }
}

fn body(reason: &str) -> String {
    let mut body = String::with_capacity(reason.len() + 1);
    body.push_str(reason.trim_end_matches('\n'));
    body.push('\n');
    body
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn codes_are_unique_and_indexed_by_position() {
        let listener_codes = ErrorCode::ALL
            .iter()
            .take_while(|c| c.on_listener())
            .count();
        assert!(ErrorCode::ALL
            .iter()
            .skip(listener_codes)
            .all(|c| !c.on_listener()));
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(
                ErrorCode::ALL
                    .iter()
                    .filter(|o| o.as_str() == c.as_str())
                    .count(),
                1
            );
            assert!(c.status().is_client_error() || c.status().is_server_error());
        }
    }

    #[test]
    fn both_renderings_say_the_same() {
        let resp: http::Response<bytes::Bytes> = ErrorCode::Overflow.response("at the limit");
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-wasp-error"], "overflow");
        assert_eq!(resp.body().as_ref(), b"at the limit\n");
        let raw = ErrorCode::Overflow.raw_http1("at the limit");
        let text = String::from_utf8(raw).unwrap_or_default();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nx-wasp-error: overflow\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-length: 13\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nat the limit\n"), "{text}");
    }
}

#[cfg(test)]
mod docs {
    use super::ErrorCode;

    /// docs/errors.md is the user's reference: every code is in it.
    #[test]
    fn error_docs_list_every_code() {
        let page = include_str!("../../docs/errors.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), code.status().as_u16());
            assert!(page.contains(&row), "docs/errors.md lacks the row {row}");
        }
    }
}
