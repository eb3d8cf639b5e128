//! The fixture file `wasp filter test` reads: its schema (every table
//! denies unknown keys) and the parse that reports problems as
//! `file:line:column`, like the main config.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::schema::FilterLimits;
use crate::config::units::Size;
use crate::filter::FailPolicy;

/// A whole fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub filter: FilterSection,
    /// `[[case]]` tables, run in file order.
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
}

/// `[filter]`: how the module is loaded, as `[filters.NAME]` would.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSection {
    /// The filter's name (its metrics' `filter` label, its log field).
    pub name: String,
    /// Handed to `proxy_on_configure`: a table becomes JSON, a string is
    /// passed as is (as in wasp.toml).
    pub config: Option<toml::Value>,
    /// Handed to `proxy_on_vm_start`.
    pub vm_config: Option<toml::Value>,
    pub fail: FailPolicy,
    /// Lowest level of the filter's log lines that are kept (and what
    /// `proxy_get_log_level` answers): trace | debug | info | warn | error.
    pub log_level: String,
    /// The same table as `[filters.NAME] limits` in wasp.toml.
    pub limits: FilterLimits,
    /// The largest body a filter may buffer, as the largest listener
    /// `limits.max_body_bytes` sets it in the proxy.
    pub max_body_bytes: Size,
}

impl Default for FilterSection {
    fn default() -> Self {
        FilterSection {
            name: "filter".to_string(),
            config: None,
            vm_config: None,
            fail: FailPolicy::Closed,
            log_level: "trace".to_string(),
            limits: FilterLimits::default(),
            max_body_bytes: Size(crate::filter::FilterSpec::DEFAULT_MAX_BODY_BYTES),
        }
    }
}

/// One `[[case]]`: a request, what the world answers, what must be seen.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// Replaces `[filter] config` for this case.
    pub config: Option<toml::Value>,
    /// A route's override of the filter's config (`filters.NAME.config` on
    /// a `[[listeners.routes]]` in wasp.toml): the stream runs on the root
    /// context configured with it, as a request of that route does, while
    /// the filter's own root keeps `config`. Equal to the filter's own
    /// config (as bytes the guest gets), it is that root, as in the proxy.
    pub route_config: Option<toml::Value>,
    #[serde(default)]
    pub request: Request,
    /// What the upstream answers if the request reaches it.
    #[serde(default)]
    pub upstream: Upstream,
    /// Answers to the filter's `http_call`s, by cluster: the n-th call to a
    /// cluster gets its n-th entry (the last one repeats). Calls to a
    /// cluster not listed get BAD_ARGUMENT, as an unknown cluster does in wasp.
    #[serde(default)]
    pub callouts: Vec<Callout>,
    #[serde(default)]
    pub expect: Expect,
}

/// Header values: one string, or a list for a repeated header.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a header value: a string, or a list of strings (quote a header name that holds a dot: \"x-a.b\" = ...)"
)]
pub enum Values {
    One(String),
    Many(Vec<String>),
}

impl Values {
    pub fn list(&self) -> Vec<String> {
        match self {
            Values::One(v) => vec![v.clone()],
            Values::Many(v) => v.clone(),
        }
    }
}

pub type Headers = BTreeMap<String, Values>;

/// The request the client sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/users?id=1`.
    pub path: String,
    /// Sent as `Host` unless `headers` has one.
    pub authority: String,
    pub headers: Headers,
    pub body: String,
    /// The body in several chunks instead of `body` (each one a body
    /// callback; the last one ends the stream unless trailers follow).
    pub chunks: Vec<String>,
    pub trailers: Headers,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            method: "GET".to_string(),
            path: "/".to_string(),
            authority: "example.com".to_string(),
            headers: Headers::new(),
            body: String::new(),
            chunks: Vec::new(),
            trailers: Headers::new(),
        }
    }
}

/// The upstream's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// The route and cluster the proxy picked (`route_name`,
    /// `cluster_name` properties), and the endpoint (`upstream.address`).
    pub route: String,
    pub cluster: String,
    pub address: String,
    pub status: u16,
    pub headers: Headers,
    pub body: String,
    /// The body in several chunks instead of `body`.
    pub chunks: Vec<String>,
    pub trailers: Headers,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            route: "default".to_string(),
            cluster: "app".to_string(),
            address: "127.0.0.1:8080".to_string(),
            status: 200,
            headers: Headers::new(),
            body: String::new(),
            chunks: Vec::new(),
            trailers: Headers::new(),
        }
    }
}

/// One answer to an `http_call` to a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callout {
    pub cluster: String,
    #[serde(default = "ok_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: String,
    /// The call fails instead of answering (as on a timeout or a refused
    /// connection); the text is for humans.
    pub fail: Option<String>,
}

fn ok_status() -> u16 {
    200
}

/// What must be observed. Only what is written is checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// The filter must fail to load, with a message containing this.
    pub load_error: Option<String>,
    pub upstream: Option<ExpectUpstream>,
    pub response: Option<ExpectResponse>,
    /// Each must be contained in one log line of the filter, in this order
    /// (lines look like `info: message`, `stdout: text`).
    pub logs: Vec<String>,
    /// Metric values as wasp exports them on /metrics: the key is the
    /// sample name, optionally with labels (`name{label="v"}`).
    pub metrics: BTreeMap<String, f64>,
    /// The `http_call`s made, in order (when given, their number must match).
    pub callouts: Option<Vec<ExpectCallout>>,
}

/// The request as the upstream received it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpectUpstream {
    /// Whether the request reached the upstream at all (default: true when
    /// this table is present).
    pub reached: Option<bool>,
    /// The cluster it was sent to: `[case.upstream] cluster`, or the
    /// filter's `wasp.cluster` choice.
    pub cluster: Option<String>,
    /// Whether the upstream request was abandoned mid-body because a filter
    /// answered the client (default false when this table is present).
    pub cut: Option<bool>,
    pub method: Option<String>,
    pub path: Option<String>,
    /// Must be present with exactly these values; others are not checked.
    pub headers: Headers,
    /// Must not be present.
    pub absent: Vec<String>,
    pub body: Option<String>,
    pub trailers: Headers,
}

/// The response as the client received it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpectResponse {
    pub status: Option<u16>,
    /// Whether the response was reset after it started because a filter
    /// answered during the response body or trailers (default false when
    /// this table is present).
    pub cut: Option<bool>,
    pub headers: Headers,
    pub absent: Vec<String>,
    pub body: Option<String>,
    pub trailers: Headers,
}

/// One `http_call` the filter made.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpectCallout {
    pub cluster: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: Headers,
    pub body: Option<String>,
}

/// Reads and parses a fixture file; the error names file, line and column.
pub fn load(path: &Path) -> Result<File, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the fixture file: {e}", path.display()))?;
    parse(&text).map_err(|(line, column, message)| {
        if line == 0 {
            format!("{}: {message}", path.display())
        } else {
            format!("{}:{line}:{column}: {message}", path.display())
        }
    })
}

/// Parses fixture text: (line, column, message) on error (0, 0 when the
/// problem has no single place).
pub fn parse(text: &str) -> Result<File, (usize, usize, String)> {
    let file: File = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        let message = match e.message().trim() {
            "" => "malformed TOML here".to_string(),
            m => m.to_string(),
        };
        (line, column, message)
    })?;
    if file.cases.is_empty() {
        return Err((0, 0, "no [[case]] in the file".to_string()));
    }
    let max = crate::filter::HostLimits::MAX_HEADERS;
    if file.filter.limits.headers > max {
        return Err((
            0,
            0,
            format!(
                "[filter] limits.headers = {} is more than {max}",
                file.filter.limits.headers
            ),
        ));
    }
    Ok(file)
}

/// A byte offset as a 1-based line and column.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors_with_their_place() {
        let text = "[[case]]\nname = \"a\"\n[case.request]\npath = \"/\"\nbogus = 1\n";
        let (line, column, msg) = parse(text).err().unwrap_or_default();
        assert_eq!((line, column), (5, 1), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn defaults_fill_a_minimal_case() {
        let f = parse("[[case]]\nname = \"a\"\n").unwrap_or_else(|e| panic!("{e:?}"));
        let c = &f.cases[0];
        assert_eq!(c.request.method, "GET");
        assert_eq!(c.request.path, "/");
        assert_eq!(c.upstream.status, 200);
        assert_eq!(f.filter.name, "filter");
        assert!(c.expect.response.is_none());
    }

    #[test]
    fn a_file_without_cases_is_refused() {
        assert!(parse("[filter]\nname = \"x\"\n").is_err());
    }
}
