//! Route matching: which route of a listener a request takes, and which
//! cluster that route sends it to.
//!
//! Pure logic, no IO: compiled once per config on the control thread, then
//! read by every worker. Routes are tried in file order and the first match
//! wins. Host matching ignores case and any port; a leading `*.` matches
//! any subdomain.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::config::schema::RouteDecl;

/// Compiled size (and lazy DFA cache) one route regex may take: ample for
/// any path pattern, small enough that a pathological one is an error.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    matcher: Matcher,
    target: Target,
    pub timeout: Option<Duration>,
    /// (matched prefix, replacement)
    rewrite_prefix: Option<(String, String)>,
    pub rewrite_host: Option<HeaderValue>,
    /// Retries of failed tries (`retry`).
    pub retry: Option<Arc<crate::upstream::RetryPolicy>>,
}

#[derive(Debug)]
struct Matcher {
    host: Option<HostMatch>,
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug)]
enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum Target {
    One(usize),
    /// Cluster ids with cumulative weights; the last entry's weight is the total.
    Weighted(Vec<(usize, u32)>),
}

/// The cluster id of the built-in `passthrough` cluster: a connection's
/// original destination (capture listeners). Never an index into the
/// config's clusters; `upstream::Upstreams::get` knows it.
pub const PASSTHROUGH: usize = usize::MAX;

/// The name routes use for [`PASSTHROUGH`].
pub const PASSTHROUGH_NAME: &str = "passthrough";

/// What a capture listener does with a request no route claims: send it
/// where the app meant it to go, untouched.
pub fn passthrough_route() -> &'static Route {
    static ROUTE: std::sync::LazyLock<Route> = std::sync::LazyLock::new(|| Route {
        name: Arc::from(PASSTHROUGH_NAME),
        matcher: Matcher {
            host: None,
            path: PathMatch::Any,
            method: None,
            headers: Vec::new(),
        },
        target: Target::One(PASSTHROUGH),
        timeout: None,
        rewrite_prefix: None,
        rewrite_host: None,
        retry: None,
    });
    &ROUTE
}

#[derive(Debug)]
pub struct RouteError {
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// Compiles the `index`-th route of a listener; `clusters` maps names to ids.
pub fn compile(
    index: usize,
    decl: &RouteDecl,
    clusters: &HashMap<&str, usize>,
) -> Result<Route, RouteError> {
    let err = |span: Option<Range<usize>>, message: String| RouteError { span, message };
    let m = &decl.matcher;
    let set = [m.prefix.is_some(), m.path.is_some(), m.regex.is_some()];
    if set.iter().filter(|s| **s).count() > 1 {
        return Err(err(
            None,
            "use only one of prefix, path and regex in a match".into(),
        ));
    }
    let path = if let Some(p) = &m.prefix {
        PathMatch::Prefix(p.clone())
    } else if let Some(p) = &m.path {
        PathMatch::Exact(p.clone())
    } else if let Some(r) = &m.regex {
        // Anchored: a path regex that matched a substring would surprise.
        // Bounded: a config regex must not be able to cost the control
        // thread (and every worker holding it) unbounded memory.
        let re = regex::RegexBuilder::new(&format!("^(?:{})$", r.get_ref()))
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| err(Some(r.span()), format!("invalid regex: {e}")))?;
        PathMatch::Regex(re)
    } else {
        PathMatch::Any
    };
    let host = m.host.as_ref().map(|h| {
        let h = h.to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(rest) => HostMatch::Suffix(rest.to_string()),
            None => HostMatch::Exact(h),
        }
    });
    let method = match &m.method {
        Some(name) => Some(
            Method::from_bytes(name.to_ascii_uppercase().as_bytes())
                .map_err(|_| err(None, format!("\"{name}\" is not an HTTP method")))?,
        ),
        None => None,
    };
    let mut headers = Vec::new();
    for (name, value) in &m.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| err(None, format!("\"{name}\" is not a valid header name")))?;
        let v = HeaderValue::from_str(value).map_err(|_| {
            err(
                None,
                format!("header {name}: \"{value}\" is not a valid value"),
            )
        })?;
        headers.push((n, v));
    }

    let lookup = |name: &toml::Spanned<String>| {
        clusters
            .get(name.get_ref().as_str())
            .copied()
            .ok_or_else(|| {
                err(
                    Some(name.span()),
                    format!(
                        "unknown cluster \"{}\" (no [clusters.{}] section)",
                        name.get_ref(),
                        name.get_ref()
                    ),
                )
            })
    };
    let target = match (&decl.cluster, &decl.clusters) {
        (Some(c), None) => Target::One(lookup(c)?),
        (None, Some(list)) if !list.is_empty() => {
            let mut total = 0u32;
            let mut out = Vec::with_capacity(list.len());
            for w in list {
                total = total.checked_add(w.weight).ok_or_else(|| {
                    err(
                        Some(w.name.span()),
                        format!("the weights of `clusters` add up to more than {}", u32::MAX),
                    )
                })?;
                out.push((lookup(&w.name)?, total));
            }
            if total == 0 {
                return Err(err(None, "the weights of `clusters` add up to 0".into()));
            }
            Target::Weighted(out)
        }
        (Some(_), Some(_)) => {
            return Err(err(
                None,
                "set either `cluster` or `clusters`, not both".into(),
            ))
        }
        _ => {
            return Err(err(
                None,
                "a route needs `cluster` or a non-empty `clusters`".into(),
            ))
        }
    };
    let rewrite_prefix = match (&decl.rewrite_prefix, &m.prefix) {
        (Some(to), Some(from)) => Some((from.clone(), to.clone())),
        (Some(_), None) => {
            return Err(err(
                None,
                "rewrite_prefix needs a `prefix` in the match".into(),
            ))
        }
        _ => None,
    };
    let rewrite_host = match &decl.rewrite_host {
        Some(h) => Some(
            HeaderValue::from_str(h)
                .map_err(|_| err(None, format!("rewrite_host \"{h}\" is not a valid host")))?,
        ),
        None => None,
    };
    Ok(Route {
        name: decl
            .name
            .clone()
            .unwrap_or_else(|| format!("route-{}", index + 1))
            .into(),
        matcher: Matcher {
            host,
            path,
            method,
            headers,
        },
        target,
        timeout: decl.timeout.map(|d| d.0),
        rewrite_prefix,
        rewrite_host,
        retry: match &decl.retry {
            Some(r) => Some(Arc::new(
                crate::upstream::RetryPolicy::from_decl(r).map_err(|m| err(None, m))?,
            )),
            None => None,
        },
    })
}

// === impl RouteTable ===

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route matching; `host` may carry a port, `path` excludes the query.
    pub fn find(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<(usize, &Route)> {
        let host = strip_port(host);
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matcher.matches(host, path, method, headers))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

// === impl Matcher ===

impl Matcher {
    fn matches(&self, host: &str, path: &str, method: &Method, headers: &HeaderMap) -> bool {
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        if let Some(h) = &self.host {
            let ok = match h {
                HostMatch::Exact(e) => host.eq_ignore_ascii_case(e),
                HostMatch::Suffix(s) => {
                    host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            };
            if !ok {
                return false;
            }
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && self
                .headers
                .iter()
                .all(|(n, v)| headers.get_all(n).iter().any(|have| have == v))
    }
}

// === impl Route ===

impl Route {
    /// The cluster id for this request; `roll` is uniform random.
    pub fn pick_cluster(&self, roll: u32) -> usize {
        match &self.target {
            Target::One(c) => *c,
            Target::Weighted(list) => {
                let total = list.last().map_or(1, |(_, w)| *w).max(1);
                let point = roll % total;
                list.iter()
                    .find(|(_, upto)| point < *upto)
                    .or(list.last())
                    .map_or(0, |(c, _)| *c)
            }
        }
    }

    /// Every cluster this route may send to (for metrics and `check`).
    pub fn clusters(&self) -> Vec<usize> {
        match &self.target {
            Target::One(c) => vec![*c],
            Target::Weighted(list) => list.iter().map(|(c, _)| *c).collect(),
        }
    }

    /// The path and query to send upstream, rewritten if the route says so.
    pub fn rewrite_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.rewrite_prefix {
            Some((from, to)) if path_and_query.starts_with(from.as_str()) => {
                let rest = &path_and_query[from.len()..];
                let mut out = String::with_capacity(to.len() + rest.len() + 1);
                out.push_str(to);
                // "/api" -> "/" applied to "/api/x" must give "/x", not "//x".
                if to.ends_with('/') && rest.starts_with('/') {
                    out.push_str(&rest[1..]);
                } else {
                    out.push_str(rest);
                }
                if out.is_empty() || !out.starts_with('/') {
                    out.insert(0, '/');
                }
                std::borrow::Cow::Owned(out)
            }
            _ => std::borrow::Cow::Borrowed(path_and_query),
        }
    }
}

#[cfg(test)]
mod tests;
