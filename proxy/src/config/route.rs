//! A route as plain data: its match, target clusters (by id), rewrites,
//! deadline, retry policy and allow list, validated from the schema.
//! `route` compiles it into a matcher when a snapshot is built.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::cluster::RetryPolicy;
use super::schema::{FilterDecl, RetryDecl, RetryOn, RouteDecl};
use super::tls::Allow;
use super::Site;

/// Compiled size (and lazy DFA cache) one route regex may take: ample for
/// any path pattern, small enough that a pathological one is an error.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One route of a listener, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    pub name: Arc<str>,
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub target: Target,
    pub timeout: Option<Duration>,
    /// (matched prefix, replacement)
    pub rewrite_prefix: Option<(String, String)>,
    pub rewrite_host: Option<HeaderValue>,
    /// Retries of failed tries (`retry`).
    pub retry: Option<Arc<RetryPolicy>>,
    /// Who may use this route (`allow`).
    pub allow: Option<Allow>,
    /// The filters this route runs instead of its listener's (`pipeline`,
    /// or the listener's plus `pipeline_append`), with per-route configs.
    /// `None`: the listener's pipeline as it is.
    pub filters: Option<RouteFilters>,
    /// Where the route is in the file (its `[[listeners.routes]]`), for a
    /// problem found compiling it.
    pub site: Site,
}

/// Distinct `filters.NAME.config` values one filter may have in a config.
pub const MAX_ROUTE_CONFIGS: usize = 64;

/// A route's own filter chain: names in request order, and the `config`
/// a filter gets on this route instead of its `[filters.NAME] config`.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteFilters {
    pub pipeline: Vec<Arc<str>>,
    /// Filter name -> the route's `filters.NAME.config` (every name is in
    /// `pipeline`).
    pub configs: BTreeMap<Arc<str>, toml::Value>,
}

impl RouteConfig {
    /// Every cluster this route may send to.
    pub fn clusters(&self) -> Vec<usize> {
        match &self.target {
            Target::One(c) => vec![*c],
            Target::Weighted(list) => list.iter().map(|(c, _)| *c).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    /// The anchored pattern; it compiled within [`REGEX_SIZE_LIMIT`].
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    One(usize),
    /// Cluster ids with cumulative weights; the last entry's weight is the total.
    Weighted(Vec<(usize, u32)>),
}

#[derive(Debug)]
pub struct RouteError {
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// Builds a route regex within the size bounds. Anchored by the caller: a
/// path regex that matched a substring would surprise. Bounded: a config
/// regex must not be able to cost the control thread (and every worker
/// holding it) unbounded memory.
pub fn build_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Validates the `index`-th route of a listener; `clusters` maps names to ids.
pub fn validate(
    index: usize,
    decl: &RouteDecl,
    clusters: &HashMap<&str, usize>,
) -> Result<RouteConfig, RouteError> {
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
        let pattern = format!("^(?:{})$", r.get_ref());
        build_regex(&pattern).map_err(|e| err(Some(r.span()), format!("invalid regex: {e}")))?;
        PathMatch::Regex(pattern)
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
    Ok(RouteConfig {
        name: decl
            .name
            .clone()
            .unwrap_or_else(|| format!("route-{}", index + 1))
            .into(),
        host,
        path,
        method,
        headers,
        target,
        timeout: decl.timeout.map(|d| d.0),
        rewrite_prefix,
        rewrite_host,
        retry: match &decl.retry {
            Some(r) => Some(Arc::new(retry_policy(r).map_err(|m| err(None, m))?)),
            None => None,
        },
        allow: decl.allow.as_ref().map(|a| Allow::new(a.get_ref().clone())),
        filters: None,
        site: Site::default(),
    })
}

/// The filters of a route: `pipeline` (replaces `listener`'s),
/// `pipeline_append` (runs after it) and `filters.NAME.config` overrides.
/// `None` when the route changes nothing. Every problem found, each with
/// the span of what it is about when the schema keeps one.
pub fn route_filters(
    decl: &RouteDecl,
    listener: &[Arc<str>],
    declared: &BTreeMap<String, FilterDecl>,
) -> Result<Option<RouteFilters>, Vec<RouteError>> {
    let err = |span: Option<Range<usize>>, message: String| RouteError { span, message };
    let mut problems = Vec::new();
    if decl.pipeline.is_none() && decl.pipeline_append.is_none() && decl.filters.is_empty() {
        return Ok(None);
    }
    let mut pipeline: Vec<Arc<str>> = match (&decl.pipeline, &decl.pipeline_append) {
        (Some(p), Some(_)) => {
            return Err(vec![err(
                Some(p.span()),
                "set either `pipeline` (replaces the listener's) or `pipeline_append` (adds to it), not both".into(),
            )]);
        }
        (Some(_), None) => Vec::new(),
        _ => listener.to_vec(),
    };
    let own = decl.pipeline.as_ref().or(decl.pipeline_append.as_ref());
    for f in own.map(|p| p.get_ref().as_slice()).unwrap_or_default() {
        let name = f.get_ref().as_str();
        if !declared.contains_key(name) {
            problems.push(err(
                Some(f.span()),
                format!(
                    "pipeline names filter \"{name}\", which no [filters.{name}] section declares"
                ),
            ));
        } else if pipeline.iter().any(|p| &**p == name) {
            let why = if decl.pipeline_append.is_some() && listener.iter().any(|p| &**p == name) {
                "is already in the listener's pipeline"
            } else {
                "is named twice"
            };
            problems.push(err(
                Some(f.span()),
                format!("filter \"{name}\" {why} (a filter runs once per request; per-route settings go in filters.{name}.config)"),
            ));
        } else {
            pipeline.push(Arc::from(name));
        }
    }
    let mut configs = BTreeMap::new();
    for (name, over) in &decl.filters {
        let span = Some(over.config.span());
        if !declared.contains_key(name) {
            problems.push(err(
                span,
                format!(
                    "filters.{name}.config: no [filters.{name}] section declares filter \"{name}\""
                ),
            ));
        } else if !pipeline.iter().any(|p| **p == **name) {
            problems.push(err(
                span,
                format!("filters.{name}.config: filter \"{name}\" is not in this route's pipeline ({}), so the setting would never be used", list(&pipeline)),
            ));
        } else {
            configs.insert(Arc::from(name.as_str()), over.config.get_ref().clone());
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Some(RouteFilters { pipeline, configs }))
}

fn list(names: &[Arc<str>]) -> String {
    if names.is_empty() {
        return "empty".into();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    quoted.join(", ")
}

fn retry_policy(decl: &RetryDecl) -> Result<RetryPolicy, String> {
    if decl.on.is_empty() {
        return Err(
            "retry.on is empty: name at least one of connect-failure, reset, 5xx, gateway-error"
                .into(),
        );
    }
    if decl.attempts > 10 {
        return Err(format!(
            "retry.attempts = {} is more than 10",
            decl.attempts
        ));
    }
    Ok(RetryPolicy {
        connect_failure: decl.on.contains(&RetryOn::ConnectFailure),
        reset: decl.on.contains(&RetryOn::Reset),
        five_xx: decl.on.contains(&RetryOn::FiveXx),
        gateway_error: decl.on.contains(&RetryOn::GatewayError),
        attempts: decl.attempts,
        per_try_timeout: decl.per_try_timeout.map(|d| d.0),
        backoff: decl.backoff.0,
    })
}
