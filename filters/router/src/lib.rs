//! # router: rule-based routing and sticky canary splits
//!
//! On request headers the rules are tried in order; the first that matches
//! picks the cluster, by setting the stream property `wasp.cluster` (the core
//! then sends the request there instead of the route's cluster). When no rule
//! matches, nothing changes.
//!
//! ```toml
//! [filters.canary]
//! module = "router.wasm"
//! config = { rules = [
//!   { header = "x-canary", equals = "1", cluster = "reviews-v2" },
//!   { cookie = "beta", equals = "yes", cluster = "reviews-v2" },
//!   { prefix = "/api/v2", cluster = "api-v2" },
//!   { split = { cluster = "reviews-v2", percent = 10, key_header = "x-user" } },
//! ] }
//! ```
//!
//! Rule kinds (exactly one per rule):
//! * `header` (+ optional `equals`; without it, presence matches) and `cluster`;
//! * `cookie` (+ optional `equals`) and `cluster`;
//! * `prefix` (path prefix, starts with `/`) and `cluster`;
//! * `split = { cluster, percent, key_header }`: a sticky percentage. The
//!   value of `key_header` is hashed (FNV-1a 64, salted with the cluster
//!   name, then mixed) into one of 10 000 slots; slots below
//!   `percent × 100` go to `cluster`. The same key always lands in the same
//!   place, on every worker and every restart, and raising `percent` only
//!   adds keys. Requests without the header do not match.
//!
//! Every rule may have a `name`; the matched rule's name is put in the
//! request header `rule_header` (default `x-wasp-router-rule`, `""` turns it
//! off) and, with `response_header = true` (default), in the response too.

#![warn(missing_docs)]

use std::rc::Rc;
use wasp_sdk::{props, Action, ConfigError, Filter, Request, Response, Root};

/// The filter's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rules, first match wins.
    pub rules: Vec<RawRule>,
    /// Header naming the matched rule (`""` = none).
    #[serde(default = "default_rule_header")]
    pub rule_header: String,
    /// Also echo the rule header on the response.
    #[serde(default = "yes")]
    pub response_header: bool,
}

fn default_rule_header() -> String {
    "x-wasp-router-rule".to_string()
}

fn yes() -> bool {
    true
}

/// One rule as written in the config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Name shown in the rule header.
    pub name: Option<String>,
    /// Header to match.
    pub header: Option<String>,
    /// Cookie to match.
    pub cookie: Option<String>,
    /// Value the header/cookie must equal.
    pub equals: Option<String>,
    /// Path prefix.
    pub prefix: Option<String>,
    /// Percentage split.
    pub split: Option<RawSplit>,
    /// Target cluster (not for `split`).
    pub cluster: Option<String>,
}

/// `split = { ... }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    /// Target cluster of the split share.
    pub cluster: String,
    /// Share in percent, 0..=100 (fractions allowed: 0.5).
    pub percent: f64,
    /// Header whose value keys the split (e.g. a user id).
    pub key_header: String,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// Header present (and equal).
    Header {
        /// Name (lower-case).
        name: String,
        /// Required value.
        equals: Option<String>,
    },
    /// Cookie present (and equal).
    Cookie {
        /// Cookie name.
        name: String,
        /// Required value.
        equals: Option<String>,
    },
    /// Path prefix.
    Prefix(String),
    /// Sticky split: slots below `threshold` of 10 000.
    Split {
        /// Key header (lower-case).
        key_header: String,
        /// Slots (of 10 000) that match.
        threshold: u64,
    },
}

/// A validated rule with its target.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Name for the rule header.
    pub name: String,
    /// What must match.
    pub matcher: Matcher,
    /// Where matching requests go.
    pub cluster: String,
}

fn validate(i: usize, r: RawRule) -> Result<Rule, ConfigError> {
    let kinds = [
        r.header.is_some(),
        r.cookie.is_some(),
        r.prefix.is_some(),
        r.split.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(
            format!("rules[{i}]: give exactly one of header, cookie, prefix, split").into(),
        );
    }
    let need_cluster = |c: Option<String>| -> Result<String, ConfigError> {
        match c {
            Some(c) if !c.is_empty() => Ok(c),
            _ => Err(format!("rules[{i}]: needs a cluster").into()),
        }
    };
    let (matcher, cluster, default_name) = if let Some(h) = r.header {
        if h.is_empty() {
            return Err(format!("rules[{i}]: header must not be empty").into());
        }
        let name = match &r.equals {
            Some(v) => format!("header:{h}={v}"),
            None => format!("header:{h}"),
        };
        let m = Matcher::Header {
            name: h.to_ascii_lowercase(),
            equals: r.equals,
        };
        (m, need_cluster(r.cluster)?, name)
    } else if let Some(c) = r.cookie {
        if c.is_empty() {
            return Err(format!("rules[{i}]: cookie must not be empty").into());
        }
        let name = match &r.equals {
            Some(v) => format!("cookie:{c}={v}"),
            None => format!("cookie:{c}"),
        };
        let m = Matcher::Cookie {
            name: c,
            equals: r.equals,
        };
        (m, need_cluster(r.cluster)?, name)
    } else if let Some(p) = r.prefix {
        if !p.starts_with('/') {
            return Err(format!("rules[{i}]: prefix {p:?} must start with '/'").into());
        }
        if r.equals.is_some() {
            return Err(format!("rules[{i}]: equals does not apply to prefix").into());
        }
        let name = format!("prefix:{p}");
        (Matcher::Prefix(p), need_cluster(r.cluster)?, name)
    } else if let Some(s) = r.split {
        if r.cluster.is_some() || r.equals.is_some() {
            return Err(format!(
                "rules[{i}]: a split names its cluster inside split = {{ cluster = ... }}"
            )
            .into());
        }
        if !(0.0..=100.0).contains(&s.percent) {
            return Err(format!("rules[{i}]: percent {} is outside 0..=100", s.percent).into());
        }
        if s.key_header.is_empty() || s.cluster.is_empty() {
            return Err(format!("rules[{i}]: split needs cluster and key_header").into());
        }
        let name = format!("split:{}:{}%", s.cluster, s.percent);
        let m = Matcher::Split {
            key_header: s.key_header.to_ascii_lowercase(),
            threshold: (s.percent * 100.0).round() as u64,
        };
        (m, s.cluster, name)
    } else {
        return Err(format!("rules[{i}]: empty rule").into());
    };
    Ok(Rule {
        name: r.name.unwrap_or(default_name),
        matcher,
        cluster,
    })
}

/// The split slot (0..10 000) of `key` for `cluster`: stable everywhere.
///
/// ```
/// let s = router::slot("reviews-v2", "user-42");
/// assert!(s < 10_000);
/// assert_eq!(s, router::slot("reviews-v2", "user-42"));
/// ```
pub fn slot(cluster: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finalizer: FNV's low bits alone are not uniform enough.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h % 10_000
}

/// The value of cookie `name` in `cookie` header values.
///
/// ```
/// let v = vec!["a=1; beta=yes".to_string(), "c=3".to_string()];
/// assert_eq!(router::cookie(&v, "beta"), Some("yes"));
/// assert_eq!(router::cookie(&v, "zzz"), None);
/// ```
pub fn cookie<'a>(headers: &'a [String], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

impl Rule {
    fn matches(&self, req: &Request) -> bool {
        match &self.matcher {
            Matcher::Header { name, equals } => match (req.header(name), equals) {
                (Some(v), Some(want)) => v == *want,
                (Some(_), None) => true,
                (None, _) => false,
            },
            Matcher::Cookie { name, equals } => {
                let values = req.headers().get_all("cookie");
                match (cookie(&values, name), equals) {
                    (Some(v), Some(want)) => v == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                }
            }
            Matcher::Prefix(p) => req.path().is_some_and(|path| path.starts_with(p.as_str())),
            Matcher::Split {
                key_header,
                threshold,
            } => req
                .header(key_header)
                .is_some_and(|k| slot(&self.cluster, &k) < *threshold),
        }
    }
}

/// Validated config.
#[derive(Debug)]
pub struct State {
    rules: Vec<Rule>,
    rule_header: String,
    response_header: bool,
}

/// The router filter.
pub struct Router {
    state: Rc<State>,
    matched: Option<usize>,
}

impl Filter for Router {
    type Config = Config;
    type State = State;

    fn configure(config: Config, _root: &mut Root) -> Result<State, ConfigError> {
        if config.rules.is_empty() {
            return Err("rules: give at least one rule".into());
        }
        let rules = config
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| validate(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(State {
            rules,
            rule_header: config.rule_header.to_ascii_lowercase(),
            response_header: config.response_header,
        })
    }

    fn new(state: &Rc<State>) -> Self {
        Router {
            state: state.clone(),
            matched: None,
        }
    }

    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        let Some(i) = self.state.rules.iter().position(|r| r.matches(req)) else {
            return Action::Continue;
        };
        let rule = &self.state.rules[i];
        self.matched = Some(i);
        if let Err(e) = props::set(props::WASP_CLUSTER, &rule.cluster) {
            wasp_sdk::warn!("router: cannot set wasp.cluster: {e}");
        }
        if !self.state.rule_header.is_empty() {
            req.set_header(&self.state.rule_header, &rule.name);
        }
        wasp_sdk::debug!("router: rule {} -> cluster {}", rule.name, rule.cluster);
        Action::Continue
    }

    fn on_response_headers(&mut self, resp: &mut Response) -> Action {
        if let (Some(i), true) = (self.matched, self.state.response_header) {
            if !self.state.rule_header.is_empty() {
                resp.set_header(&self.state.rule_header, &self.state.rules[i].name);
            }
        }
        Action::Continue
    }
}

wasp_sdk::register!(Router);

#[cfg(test)]
mod tests;
