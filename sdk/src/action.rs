//! What a hook tells the proxy to do next: [`Action`], and the
//! [`LocalResponse`] a filter can answer with instead of going upstream.

/// The result of a request or response hook.
///
/// * `Continue`: pass the headers/body/trailers on.
/// * `Pause`: hold the stream. On headers, nothing moves until the filter
///   resumes it (typically from [`Filter::on_callout_response`]). On a body
///   chunk that is not the last, the proxy buffers and calls the body hook
///   again with the whole body so far: return `Pause` until
///   [`Request::end_of_stream`] to see the full body.
/// * `Respond(r)`: answer the client with `r` now; the request does not go
///   upstream (or, on the response side, the upstream response is replaced).
///
/// [`Filter::on_callout_response`]: crate::Filter::on_callout_response
/// [`Request::end_of_stream`]: crate::Request::end_of_stream
///
/// ```
/// use wasp_sdk::{Action, LocalResponse};
/// let deny = Action::Respond(LocalResponse::new(403).body("forbidden"));
/// assert!(matches!(deny, Action::Respond(ref r) if r.status() == 403));
/// assert_eq!(Action::default(), Action::Continue);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    #[default]
    Continue,
    /// Hold the stream (see the type docs).
    Pause,
    /// Answer with a response made here.
    Respond(LocalResponse),
}

impl From<LocalResponse> for Action {
    fn from(r: LocalResponse) -> Self {
        Action::Respond(r)
    }
}

/// A response the filter makes itself (`proxy_send_local_response`).
///
/// ```
/// use wasp_sdk::LocalResponse;
/// let r = LocalResponse::new(429)
///     .header("retry-after", "1")
///     .body("slow down\n")
///     .details("rate_limited");
/// assert_eq!(r.status(), 429);
/// assert_eq!(r.headers()[0], ("retry-after".to_string(), "1".to_string()));
/// assert_eq!(r.body_bytes(), b"slow down\n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    details: String,
}

impl LocalResponse {
    /// A response with `status` and no headers or body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            details: String::new(),
        }
    }

    /// A `text/plain` response: `LocalResponse::text(403, "forbidden\n")`.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.into())
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the short reason the proxy records (status code details), e.g.
    /// `"denied_by_authz"`.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The status details.
    pub fn details_str(&self) -> &str {
        &self.details
    }

    /// Sends it through the host. The runtime calls this for
    /// [`Action::Respond`]; filters rarely need to.
    pub(crate) fn send(&self) -> Result<(), crate::HostError> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::host::with(|h| {
            h.send_local_response(u32::from(self.status), &self.details, &self.body, &headers)
        })
        .map_err(|s| crate::HostError::new("proxy_send_local_response", s))
    }
}
