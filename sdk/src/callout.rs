//! HTTP callouts (`proxy_http_call`) to a cluster named in the TOML.
//!
//! From a request hook: send the callout, return
//! [`Action::Pause`](crate::Action::Pause), and decide in
//! [`Filter::on_callout_response`](crate::Filter::on_callout_response): return
//! `Continue` to resume the request or `Respond(..)` to reject it. From the
//! root (e.g. a timer), the answer goes to
//! [`Filter::on_root_callout_response`](crate::Filter::on_root_callout_response).
//! An unknown cluster fails at send time (`BAD_ARGUMENT`).
//!
//! ```
//! use wasp_sdk::callout::Callout;
//! use std::time::Duration;
//! let call = Callout::get("authz", "/check?user=bob")
//!     .header("x-api-key", "k")
//!     .timeout(Duration::from_millis(250));
//! assert_eq!(call.cluster(), "authz");
//! // call.send() returns the id of the pending callout.
//! ```

use crate::{host, HostError};
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    /// Ids sent during the current callback; the runtime claims them for the
    /// context that is running, so the answer reaches the right filter.
    static SENT: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn take_sent() -> Vec<u32> {
    SENT.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// Identifies one callout; compare it with [`CalloutResponse::id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CalloutId(pub(crate) u32);

impl CalloutId {
    /// The host's token for the call.
    pub fn token(&self) -> u32 {
        self.0
    }
}

/// An outgoing HTTP request to a cluster. Builder style; [`send`](Self::send)
/// hands it to the proxy.
#[derive(Debug, Clone)]
pub struct Callout {
    cluster: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    timeout: Duration,
}

impl Callout {
    /// A request with `method` and `path` to `cluster`; `:authority` defaults
    /// to the cluster name, the timeout to 1 s.
    pub fn new(method: &str, cluster: &str, path: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), cluster.into()),
                (":scheme".into(), "http".into()),
            ],
            body: Vec::new(),
            trailers: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }

    /// A GET.
    pub fn get(cluster: &str, path: &str) -> Self {
        Self::new("GET", cluster, path)
    }

    /// A POST with `body`.
    pub fn post(cluster: &str, path: &str, body: impl Into<Vec<u8>>) -> Self {
        Self::new("POST", cluster, path).body(body)
    }

    /// Adds a header (or replaces a pseudo-header such as `:authority`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if name.starts_with(':') {
            self.headers.retain(|(k, _)| k != name);
        }
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the timeout (the answer is then a failure).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The target cluster.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Sends it. The answer arrives in `on_callout_response` (from a stream
    /// hook) or `on_root_callout_response` (from the root).
    pub fn send(self) -> Result<CalloutId, HostError> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let trailers: Vec<(&str, &str)> = self
            .trailers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ms = u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX);
        let token = host::with(|h| h.http_call(&self.cluster, &headers, &self.body, &trailers, ms))
            .map_err(|s| HostError::new("proxy_http_call", s))?;
        SENT.with(|s| s.borrow_mut().push(token));
        Ok(CalloutId(token))
    }
}

/// The answer to a [`Callout`]: status, headers, body, trailers. A failed call
/// (timeout, connection error) has no headers: see [`is_failure`](Self::is_failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutResponse {
    pub(crate) id: CalloutId,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Vec<(String, String)>,
}

impl CalloutResponse {
    /// Which callout this answers.
    pub fn id(&self) -> CalloutId {
        self.id
    }

    /// The `:status`, if the call got a response.
    pub fn status(&self) -> Option<u16> {
        self.header(":status")?.trim().parse().ok()
    }

    /// True when the call failed (no response at all).
    pub fn is_failure(&self) -> bool {
        self.headers.is_empty()
    }

    /// True for a 2xx response.
    pub fn is_success(&self) -> bool {
        matches!(self.status(), Some(200..=299))
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The trailers.
    pub fn trailers(&self) -> &[(String, String)] {
        &self.trailers
    }
}
