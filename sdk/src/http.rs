//! The views a hook receives: [`Request`], [`Response`] and, at the end,
//! [`Log`]. They are thin handles (a couple of integers): every accessor is
//! one host call, so read what you need and keep the values you reuse.

use crate::abi::{BufferType, MapType};
use crate::headers::Headers;
use crate::{body, props};
use std::time::Duration;

/// The request side of the stream, handed to the request hooks and to
/// [`Filter::on_callout_response`](crate::Filter::on_callout_response).
///
/// ```
/// use wasp_sdk::{Action, Request};
/// fn on_request_headers(req: &mut Request) -> Action {
///     if req.path().is_some_and(|p| p.starts_with("/admin")) {
///         return Action::Respond(wasp_sdk::LocalResponse::text(403, "no\n"));
///     }
///     req.set_header("x-seen-by", "wasp");
///     Action::Continue
/// }
/// # let _ = on_request_headers;
/// ```
#[derive(Debug)]
pub struct Request {
    eos: bool,
    body_size: usize,
}

impl Request {
    pub(crate) fn new(eos: bool, body_size: usize) -> Self {
        Self { eos, body_size }
    }

    /// The request headers (including `:method`, `:path`, `:authority`).
    pub fn headers(&self) -> Headers {
        Headers::new(MapType::RequestHeaders)
    }

    /// The request trailers (in `on_request_trailers`).
    pub fn trailers(&self) -> Headers {
        Headers::new(MapType::RequestTrailers)
    }

    /// A request header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers().get(name)
    }

    /// Sets a request header, replacing existing values.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers().set(name, value)
    }

    /// Adds a request header value.
    pub fn add_header(&mut self, name: &str, value: &str) {
        self.headers().add(name, value)
    }

    /// Removes a request header.
    pub fn remove_header(&mut self, name: &str) {
        self.headers().remove(name)
    }

    /// The method (`GET`, ...).
    pub fn method(&self) -> Option<String> {
        props::get_string(props::REQUEST_METHOD).or_else(|| self.header(":method"))
    }

    /// Path and query.
    pub fn path(&self) -> Option<String> {
        props::get_string(props::REQUEST_PATH).or_else(|| self.header(":path"))
    }

    /// The authority (`Host`).
    pub fn host(&self) -> Option<String> {
        props::get_string(props::REQUEST_HOST).or_else(|| self.header(":authority"))
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> Option<String> {
        props::get_string(props::REQUEST_SCHEME).or_else(|| self.header(":scheme"))
    }

    /// The request id (`x-request-id`).
    pub fn id(&self) -> Option<String> {
        props::get_string(props::REQUEST_ID).or_else(|| self.header("x-request-id"))
    }

    /// The client's `ip:port`.
    pub fn source_address(&self) -> Option<String> {
        props::get_string(props::SOURCE_ADDRESS)
    }

    /// The listener that accepted the request.
    pub fn listener(&self) -> Option<String> {
        props::get_string(props::LISTENER_NAME)
    }

    /// The matched route (after routing: not yet during request headers).
    pub fn route(&self) -> Option<String> {
        props::get_string(props::ROUTE_NAME)
    }

    /// The chosen cluster: what a filter set with [`set_cluster`](Self::set_cluster),
    /// else the routed cluster.
    pub fn cluster(&self) -> Option<String> {
        props::get_string(props::WASP_CLUSTER).or_else(|| props::get_string(props::CLUSTER_NAME))
    }

    /// Sends this request to `cluster` instead of the route's (sets
    /// `wasp.cluster`; call it from `on_request_headers`). The cluster must
    /// exist, or the proxy answers 503 `unknown_cluster`.
    pub fn set_cluster(&mut self, cluster: &str) {
        if let Err(e) = props::set(props::WASP_CLUSTER, cluster) {
            crate::warn!("cannot set wasp.cluster: {e}");
        }
    }

    /// True when nothing follows this callback's data on the request side.
    pub fn end_of_stream(&self) -> bool {
        self.eos
    }

    /// Bytes buffered for this body callback (0 outside the body hook).
    pub fn body_size(&self) -> usize {
        self.body_size
    }

    /// The body buffered so far (in `on_request_body`).
    pub fn body(&self) -> Vec<u8> {
        body::read(BufferType::RequestBody, self.body_size)
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }

    /// Replaces the buffered body (in `on_request_body`). Fix up
    /// `content-length` in `on_request_headers` if you change the size.
    pub fn set_body(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        body::replace(BufferType::RequestBody, self.body_size, bytes);
        self.body_size = bytes.len();
    }
}

/// The response side of the stream, handed to the response hooks.
///
/// ```
/// use wasp_sdk::{Action, Response};
/// fn on_response_headers(resp: &mut Response) -> Action {
///     if resp.status() == Some(500) {
///         resp.set_header("retry-after", "1");
///     }
///     resp.remove_header("server");
///     Action::Continue
/// }
/// # let _ = on_response_headers;
/// ```
#[derive(Debug)]
pub struct Response {
    eos: bool,
    body_size: usize,
}

impl Response {
    pub(crate) fn new(eos: bool, body_size: usize) -> Self {
        Self { eos, body_size }
    }

    /// The response headers (including `:status`).
    pub fn headers(&self) -> Headers {
        Headers::new(MapType::ResponseHeaders)
    }

    /// The response trailers.
    pub fn trailers(&self) -> Headers {
        Headers::new(MapType::ResponseTrailers)
    }

    /// A response header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers().get(name)
    }

    /// Sets a response header, replacing existing values.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers().set(name, value)
    }

    /// Adds a response header value.
    pub fn add_header(&mut self, name: &str, value: &str) {
        self.headers().add(name, value)
    }

    /// Removes a response header.
    pub fn remove_header(&mut self, name: &str) {
        self.headers().remove(name)
    }

    /// The status code.
    pub fn status(&self) -> Option<u16> {
        self.header(":status")
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| props::get_i64(props::RESPONSE_CODE).and_then(|c| u16::try_from(c).ok()))
    }

    /// Changes the status code.
    pub fn set_status(&mut self, status: u16) {
        self.set_header(":status", &status.to_string())
    }

    /// True when nothing follows this callback's data on the response side.
    pub fn end_of_stream(&self) -> bool {
        self.eos
    }

    /// Bytes buffered for this body callback.
    pub fn body_size(&self) -> usize {
        self.body_size
    }

    /// The body buffered so far (in `on_response_body`).
    pub fn body(&self) -> Vec<u8> {
        body::read(BufferType::ResponseBody, self.body_size)
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }

    /// Replaces the buffered body (in `on_response_body`).
    pub fn set_body(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        body::replace(BufferType::ResponseBody, self.body_size, bytes);
        self.body_size = bytes.len();
    }
}

/// Read-only view of the finished stream, handed to
/// [`Filter::on_log`](crate::Filter::on_log): headers of both sides and the
/// properties the proxy fills in at the end (status, duration, sizes, ...).
///
/// ```
/// fn on_log(log: &wasp_sdk::Log) {
///     wasp_sdk::info!(
///         "{} {} -> {:?} in {:?}",
///         log.method().unwrap_or_default(),
///         log.path().unwrap_or_default(),
///         log.status(),
///         log.duration(),
///     );
/// }
/// # on_log(&wasp_sdk::Log::new_for_docs());
/// ```
#[derive(Debug)]
pub struct Log {
    _priv: (),
}

impl Log {
    pub(crate) fn new() -> Self {
        Self { _priv: () }
    }

    #[doc(hidden)]
    pub fn new_for_docs() -> Self {
        Self::new()
    }

    /// The request headers as they went upstream.
    pub fn request_headers(&self) -> Headers {
        Headers::new(MapType::RequestHeaders)
    }

    /// The response headers as they went to the client.
    pub fn response_headers(&self) -> Headers {
        Headers::new(MapType::ResponseHeaders)
    }

    /// A request header.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers().get(name)
    }

    /// A response header.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_headers().get(name)
    }

    /// The method.
    pub fn method(&self) -> Option<String> {
        props::get_string(props::REQUEST_METHOD).or_else(|| self.request_header(":method"))
    }

    /// Path and query.
    pub fn path(&self) -> Option<String> {
        props::get_string(props::REQUEST_PATH).or_else(|| self.request_header(":path"))
    }

    /// The authority.
    pub fn authority(&self) -> Option<String> {
        props::get_string(props::REQUEST_HOST).or_else(|| self.request_header(":authority"))
    }

    /// The final status code sent to the client.
    pub fn status(&self) -> Option<u16> {
        props::get_i64(props::RESPONSE_CODE)
            .and_then(|c| u16::try_from(c).ok())
            .or_else(|| {
                self.response_header(":status")
                    .and_then(|s| s.trim().parse().ok())
            })
    }

    /// Time from the first request byte to the end of the stream.
    pub fn duration(&self) -> Option<Duration> {
        props::get_duration(props::REQUEST_DURATION)
    }

    /// Request body bytes.
    pub fn bytes_in(&self) -> Option<u64> {
        props::get_i64(props::REQUEST_SIZE).and_then(|n| u64::try_from(n).ok())
    }

    /// Response body bytes.
    pub fn bytes_out(&self) -> Option<u64> {
        props::get_i64(props::RESPONSE_SIZE).and_then(|n| u64::try_from(n).ok())
    }

    /// The upstream endpoint `ip:port`.
    pub fn upstream(&self) -> Option<String> {
        props::get_string(props::UPSTREAM_ADDRESS)
    }

    /// The listener.
    pub fn listener(&self) -> Option<String> {
        props::get_string(props::LISTENER_NAME)
    }

    /// The matched route.
    pub fn route(&self) -> Option<String> {
        props::get_string(props::ROUTE_NAME)
    }

    /// The cluster the request went to.
    pub fn cluster(&self) -> Option<String> {
        props::get_string(props::CLUSTER_NAME).or_else(|| props::get_string(props::WASP_CLUSTER))
    }

    /// The `x-wasp-error` code when the proxy made the response.
    pub fn error(&self) -> Option<String> {
        props::get_string(props::WASP_ERROR)
    }

    /// The request id.
    pub fn request_id(&self) -> Option<String> {
        props::get_string(props::REQUEST_ID).or_else(|| self.request_header("x-request-id"))
    }

    /// The trace id set by the trace-context filter.
    pub fn trace_id(&self) -> Option<String> {
        props::get_string(props::WASP_TRACE_ID)
    }

    /// Any property (see [`props`]).
    pub fn property(&self, name: &str) -> Option<String> {
        props::get_string(name)
    }
}
