//! Stream and plugin properties (`proxy_get_property` / `proxy_set_property`).
//!
//! Names are dotted (`request.path`, `wasp.cluster`) and sent as the ABI's
//! NUL-joined segments (`request\0path`); see `docs/filter-contract.md` for
//! the names wasp provides and when. Encodings follow Envoy: strings are raw
//! UTF-8, integers are 8-byte little-endian `i64` (durations and times in ns).
//! A missing property is `None`, never an error.
//!
//! Values you set live on the stream: every later filter and the core see
//! them. The core reads [`WASP_CLUSTER`] (route this request to that
//! cluster) and [`WASP_TRACE_ID`]/[`WASP_SPAN_ID`] (access log, tracing).
//!
//! ```
//! use wasp_sdk::props;
//! // Outside a proxy (or a test harness) nothing is set:
//! assert_eq!(props::get_string(props::REQUEST_PATH), None);
//! ```

use crate::abi::{encode_path, encode_segments};
use crate::{host, HostError};
use std::time::Duration;

/// `request.path`: path and query (string).
pub const REQUEST_PATH: &str = "request.path";
/// `request.url_path`: path without query (string).
pub const REQUEST_URL_PATH: &str = "request.url_path";
/// `request.host`: the authority (string).
pub const REQUEST_HOST: &str = "request.host";
/// `request.scheme`: `http` or `https`.
pub const REQUEST_SCHEME: &str = "request.scheme";
/// `request.method` (string).
pub const REQUEST_METHOD: &str = "request.method";
/// `request.id`: the `x-request-id` (string).
pub const REQUEST_ID: &str = "request.id";
/// `request.protocol`: `HTTP/1.1`, `HTTP/2` (string).
pub const REQUEST_PROTOCOL: &str = "request.protocol";
/// `request.time`: i64 ns since the Unix epoch.
pub const REQUEST_TIME: &str = "request.time";
/// `request.duration`: i64 ns (at log).
pub const REQUEST_DURATION: &str = "request.duration";
/// `request.size`: request body bytes, i64 (at log).
pub const REQUEST_SIZE: &str = "request.size";
/// `response.size`: response body bytes, i64 (at log).
pub const RESPONSE_SIZE: &str = "response.size";
/// `response.code`: i64 (after response headers).
pub const RESPONSE_CODE: &str = "response.code";
/// `source.address`: `ip:port` of the client.
pub const SOURCE_ADDRESS: &str = "source.address";
/// `source.principal`: peer identity under mTLS.
pub const SOURCE_PRINCIPAL: &str = "source.principal";
/// `destination.address`: `ip:port` the client connected to.
pub const DESTINATION_ADDRESS: &str = "destination.address";
/// `upstream.address`: `ip:port` of the picked endpoint.
pub const UPSTREAM_ADDRESS: &str = "upstream.address";
/// `listener_name` (string).
pub const LISTENER_NAME: &str = "listener_name";
/// `route_name` (after routing).
pub const ROUTE_NAME: &str = "route_name";
/// `cluster_name` (after routing).
pub const CLUSTER_NAME: &str = "cluster_name";
/// `plugin_name`: this filter's name in the TOML.
pub const PLUGIN_NAME: &str = "plugin_name";
/// `wasp.error`: the `x-wasp-error` code of a proxy-made response (at log).
pub const WASP_ERROR: &str = "wasp.error";
/// `wasp.cluster`: set during request headers to pick the upstream cluster.
pub const WASP_CLUSTER: &str = "wasp.cluster";
/// `wasp.trace_id`: 32 hex chars, set by the trace-context filter.
pub const WASP_TRACE_ID: &str = "wasp.trace_id";
/// `wasp.span_id`: 16 hex chars, set by the trace-context filter.
pub const WASP_SPAN_ID: &str = "wasp.span_id";

/// Raw bytes of a property.
pub fn get(name: &str) -> Option<Vec<u8>> {
    host::with(|h| h.property(&encode_path(name))).unwrap_or(None)
}

/// Raw bytes of a property given as explicit segments (when a segment itself
/// contains a dot).
pub fn get_segments(segments: &[&str]) -> Option<Vec<u8>> {
    host::with(|h| h.property(&encode_segments(segments))).unwrap_or(None)
}

/// A string property (lossy UTF-8).
pub fn get_string(name: &str) -> Option<String> {
    get(name).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// An integer property (8-byte little-endian; `None` if absent or not 8 bytes).
pub fn get_i64(name: &str) -> Option<i64> {
    let b = get(name)?;
    let arr: [u8; 8] = b.as_slice().try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

/// A nanosecond property as a [`Duration`] (negative values are `None`).
pub fn get_duration(name: &str) -> Option<Duration> {
    let ns = get_i64(name)?;
    u64::try_from(ns).ok().map(Duration::from_nanos)
}

/// Sets a property on the stream.
///
/// ```
/// wasp_sdk::props::set(wasp_sdk::props::WASP_CLUSTER, "reviews-v2").unwrap();
/// ```
pub fn set(name: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
    host::with(|h| h.set_property(&encode_path(name), value.as_ref()))
        .map_err(|s| HostError::new("proxy_set_property", s))
}

/// Sets an integer property (8-byte little-endian).
pub fn set_i64(name: &str, value: i64) -> Result<(), HostError> {
    set(name, value.to_le_bytes())
}

/// Sets a property given as explicit segments.
pub fn set_segments(segments: &[&str], value: impl AsRef<[u8]>) -> Result<(), HostError> {
    host::with(|h| h.set_property(&encode_segments(segments), value.as_ref()))
        .map_err(|s| HostError::new("proxy_set_property", s))
}
