//! Route matching: which route of a listener a request takes, and which
//! cluster that route sends it to.
//!
//! Pure logic, no IO: compiled from the validated [`RouteConfig`] once per
//! snapshot on the control thread, then read by every worker. Routes are tried in file order and the first match
//! wins. Host matching ignores case and any port; a leading `*.` matches
//! any subdomain.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

pub use crate::config::l4::{TcpMatch, PASSTHROUGH, PASSTHROUGH_NAME};
use crate::config::route::build_regex;
pub use crate::config::route::{HostMatch, PathMatch, RouteConfig, Target};
use crate::config::Allow;
use crate::telemetry::{RequestStats, TcpStats};

pub mod normalize;

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
    pub retry: Option<Arc<crate::config::RetryPolicy>>,
    /// Who may use this route (`allow`).
    pub allow: Option<Allow>,
    /// The series for each cluster this route may pick.
    pub stats: Vec<(usize, RequestStats)>,
}

/// A TCP route of a `tcp` or capture listener: the route (name, target
/// clusters), the connections it takes and the L4 series of each cluster
/// it may pick.
#[derive(Debug)]
pub struct TcpRoute {
    pub route: Route,
    pub matcher: TcpMatch,
    pub stats: Vec<(usize, TcpStats)>,
}

#[derive(Debug)]
struct Matcher {
    host: Option<HostMatch>,
    path: CompiledPath,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug)]
enum CompiledPath {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// Compiles a validated route; `stats` are its series per cluster it may pick.
pub fn compile(config: &RouteConfig, stats: Vec<(usize, RequestStats)>) -> Result<Route, String> {
    let path = match &config.path {
        PathMatch::Any => CompiledPath::Any,
        PathMatch::Exact(p) => CompiledPath::Exact(p.clone()),
        PathMatch::Prefix(p) => CompiledPath::Prefix(p.clone()),
        PathMatch::Regex(pattern) => {
            CompiledPath::Regex(build_regex(pattern).map_err(|e| format!("invalid regex: {e}"))?)
        }
    };
    Ok(Route {
        name: config.name.clone(),
        matcher: Matcher {
            host: config.host.clone(),
            path,
            method: config.method.clone(),
            headers: config.headers.clone(),
        },
        target: config.target.clone(),
        timeout: config.timeout,
        rewrite_prefix: config.rewrite_prefix.clone(),
        rewrite_host: config.rewrite_host.clone(),
        retry: config.retry.clone(),
        allow: config.allow.clone(),
        stats,
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
            CompiledPath::Any => true,
            CompiledPath::Exact(p) => path == p,
            CompiledPath::Prefix(p) => path.starts_with(p.as_str()),
            CompiledPath::Regex(r) => r.is_match(path),
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
