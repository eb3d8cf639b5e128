//! Test filters without a proxy (host target only; not compiled into `.wasm`).
//!
//! A [`Harness`] runs your filter's real dispatcher (the same code the
//! `proxy_on_*` exports call in a VM) against an in-memory host that behaves
//! like wasp: it keeps the header maps and bodies, answers properties, records
//! logs, metrics, shared data and callouts, and plays the proxy's order of
//! callbacks: request headers → body → trailers → (routing) → response
//! headers → body → trailers → log.
//!
//! ```
//! use std::rc::Rc;
//! use wasp_sdk::{Action, ConfigError, Filter, Request, Response, Root};
//! use wasp_sdk::testing::{Harness, TestRequest, TestResponse};
//!
//! #[derive(serde::Deserialize)]
//! struct Cfg { name: String }
//! struct Hello(Rc<Cfg>);
//! impl Filter for Hello {
//!     type Config = Cfg;
//!     type State = Cfg;
//!     fn configure(c: Cfg, _: &mut Root) -> Result<Cfg, ConfigError> { Ok(c) }
//!     fn new(c: &Rc<Cfg>) -> Self { Hello(c.clone()) }
//!     fn on_request_headers(&mut self, req: &mut Request) -> Action {
//!         req.set_header("x-hello", &self.0.name);
//!         Action::Continue
//!     }
//!     fn on_response_headers(&mut self, resp: &mut Response) -> Action {
//!         resp.set_header("x-served-by", "wasp");
//!         Action::Continue
//!     }
//! }
//!
//! let mut h = Harness::<Hello>::new().config_toml(r#"name = "world""#).build();
//! let done = h.run_with(
//!     TestRequest::get("/").header("x-user", "ann"),
//!     TestResponse::new(201).body("made"),
//! );
//! assert_eq!(done.upstream().header("x-hello"), Some("world"));
//! assert_eq!(done.status(), 201);
//! assert_eq!(done.response_header("x-served-by"), Some("wasp"));
//! assert_eq!(done.response().body_text(), "made");
//! ```
//!
//! Callouts are answered step by step with [`Harness::request`]; see
//! [`Exchange`]. Metrics, logs, shared data and timers are on the
//! [`Harness`].

mod harness;
mod host;

pub use harness::{Completed, Exchange, Harness, HarnessBuilder};

use crate::callout::CalloutId;
use crate::log::Level;
use std::time::Duration;

fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A request as the client sends it.
///
/// ```
/// use wasp_sdk::testing::TestRequest;
/// let r = TestRequest::post("/orders", r#"{"id":1}"#)
///     .header("content-type", "application/json")
///     .authority("shop")
///     .source("10.0.0.7:5555");
/// assert_eq!(r.header_value(":authority"), Some("shop"));
/// ```
#[derive(Debug, Clone)]
pub struct TestRequest {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) chunks: Vec<Vec<u8>>,
    pub(crate) trailers: Vec<(String, String)>,
    pub(crate) source: String,
}

impl TestRequest {
    /// A request with `method` and `path` (and query) to authority
    /// `test.local`.
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), "test.local".into()),
                (":scheme".into(), "http".into()),
            ],
            chunks: Vec::new(),
            trailers: Vec::new(),
            source: "127.0.0.1:40000".into(),
        }
    }

    /// A GET.
    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    /// A POST with `body`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Self {
        Self::new("POST", path).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Sets `:authority` (the Host).
    pub fn authority(mut self, authority: &str) -> Self {
        self.set_pseudo(":authority", authority);
        self
    }

    /// Sets `:scheme`.
    pub fn scheme(mut self, scheme: &str) -> Self {
        self.set_pseudo(":scheme", scheme);
        self
    }

    /// The body, in one chunk.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.chunks = vec![body.into()];
        self
    }

    /// The body, as several chunks (to test buffering).
    pub fn chunks<B: Into<Vec<u8>>>(mut self, chunks: impl IntoIterator<Item = B>) -> Self {
        self.chunks = chunks.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The client's `ip:port` (`source.address`).
    pub fn source(mut self, addr: &str) -> Self {
        self.source = addr.to_string();
        self
    }

    /// A header of this request as built.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    fn set_pseudo(&mut self, name: &str, value: &str) {
        match self.headers.iter_mut().find(|(k, _)| k == name) {
            Some(p) => p.1 = value.to_string(),
            None => self.headers.push((name.into(), value.into())),
        }
    }
}

/// A response as the upstream (or a callout target) sends it.
///
/// ```
/// use wasp_sdk::testing::TestResponse;
/// let r = TestResponse::new(503)
///     .header("retry-after", "2")
///     .body("busy")
///     .latency(std::time::Duration::from_millis(40));
/// assert_eq!(r.status_code(), 503);
/// ```
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) chunks: Vec<Vec<u8>>,
    pub(crate) trailers: Vec<(String, String)>,
    pub(crate) latency: Duration,
}

impl TestResponse {
    /// A response with `status`.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
            latency: Duration::from_millis(1),
        }
    }

    /// 200 OK.
    pub fn ok() -> Self {
        Self::new(200)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The body, in one chunk.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.chunks = vec![body.into()];
        self
    }

    /// The body, as several chunks.
    pub fn chunks<B: Into<Vec<u8>>>(mut self, chunks: impl IntoIterator<Item = B>) -> Self {
        self.chunks = chunks.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// How long the whole exchange took (`request.duration` at log; default 1 ms).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The status code.
    pub fn status_code(&self) -> u16 {
        self.status
    }

    pub(crate) fn header_pairs(&self) -> Vec<(String, String)> {
        let mut h = vec![(":status".to_string(), self.status.to_string())];
        h.extend(self.headers.iter().cloned());
        h
    }
}

/// An HTTP message as it left the filter: what went upstream, or what the
/// client received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Headers in order, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The trailers.
    pub trailers: Vec<(String, String)>,
}

impl Message {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// Every value of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A trailer.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        find(&self.trailers, name)
    }

    /// `:status` as a number (responses).
    pub fn status(&self) -> Option<u16> {
        self.header(":status")?.parse().ok()
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A local response the filter sent (`Action::Respond`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// Status code.
    pub status: u16,
    /// Status details.
    pub details: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl LocalReply {
    /// A header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn to_message(&self) -> Message {
        let mut headers = vec![(":status".to_string(), self.status.to_string())];
        headers.extend(self.headers.iter().cloned());
        Message {
            headers,
            body: self.body.clone(),
            trailers: Vec::new(),
        }
    }
}

/// One line the filter logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Level.
    pub level: Level,
    /// Text.
    pub message: String,
}

/// A callout the filter sent, as the cluster would receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutRecord {
    /// Its id (what `Callout::send` returned).
    pub id: CalloutId,
    /// Target cluster.
    pub cluster: String,
    /// Headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
    /// Timeout.
    pub timeout: Duration,
}

impl CalloutRecord {
    /// A header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// `:method`.
    pub fn method(&self) -> &str {
        self.header(":method").unwrap_or_default()
    }

    /// `:path`.
    pub fn path(&self) -> &str {
        self.header(":path").unwrap_or_default()
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A metric's value in the test host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    /// A counter.
    Counter(u64),
    /// A gauge.
    Gauge(i64),
    /// A histogram's recorded samples, in order.
    Histogram(Vec<u64>),
}
