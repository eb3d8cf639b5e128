//! Validation of the upstream keys of a cluster: `discovery`, `hash_key`,
//! `health`, `outlier`, `limits`, `decay`, into the plain settings of
//! [`super::cluster`]. Every problem is reported with its position, like
//! the rest of the config.

use std::time::Duration;

use http::HeaderName;

use super::cluster::{
    self as discovery, ClusterSettings, Discovery, DnsSettings, HashKey, HealthSettings, Limits,
    OutlierSettings,
};
use super::{schema, Validator};
use crate::config::Balance;

impl Validator<'_> {
    /// The typed settings of cluster `name`.
    pub(super) fn cluster_settings(
        &mut self,
        name: &str,
        decl: &schema::ClusterDecl,
    ) -> ClusterSettings {
        let discovery = match (&decl.endpoints, &decl.discovery) {
            (Some(list), Some(_)) => {
                self.at(
                    Some(list.span()),
                    format!("cluster \"{name}\": set `endpoints` or `discovery`, not both"),
                );
                Discovery::Static
            }
            (None, None) => {
                self.at_key(
                    &format!("clusters.{name}"),
                    None,
                    format!("cluster \"{name}\" needs `endpoints` or `discovery`"),
                );
                Discovery::Static
            }
            (Some(_), None) => Discovery::Static,
            (None, Some(d)) => self.discovery(name, d),
        };
        let hash_key = match &decl.hash_key {
            Some(k) => self.hash_key(name, k),
            None => {
                if matches!(decl.balance, Balance::RingHash | Balance::Maglev) {
                    self.at_key(
                        &format!("clusters.{name}"),
                        Some("balance"),
                        format!("cluster \"{name}\": balance = \"{}\" needs `hash_key = {{ header = \"...\" }}` (or cookie, or source_ip = true)", balance_name(decl.balance)),
                    );
                }
                None
            }
        };
        let health = decl.health.as_ref().and_then(|h| match health_settings(h) {
            Ok(h) => Some(h),
            Err(e) => {
                self.at_key(
                    &format!("clusters.{name}"),
                    Some("health"),
                    format!("cluster \"{name}\": {e}"),
                );
                None
            }
        });
        self.cluster_counts(name, decl);
        if decl.decay.0.is_zero() {
            self.at_key(
                &format!("clusters.{name}"),
                Some("decay"),
                format!("cluster \"{name}\": decay must be more than 0"),
            );
        }
        if let Some(b) = &decl.retry_budget {
            if !(0.0..=10.0).contains(&b.ratio) {
                self.at_key(
                    &format!("clusters.{name}"),
                    Some("retry_budget"),
                    format!(
                        "cluster \"{name}\": retry_budget.ratio = {} is not between 0 and 10",
                        b.ratio
                    ),
                );
            }
        }
        let l = &decl.limits;
        ClusterSettings {
            discovery,
            hash_key,
            health,
            outlier: decl.outlier.as_ref().map(|o| OutlierSettings {
                consecutive_failures: o.consecutive_failures.max(1),
                base_ejection: o.base_ejection.0,
                max_ejection_percent: o.max_ejection_percent.min(100),
            }),
            limits: Limits {
                max_connections: l.max_connections,
                max_pending: l.max_pending,
                max_requests: l.max_requests,
            },
            decay: if decl.decay.0.is_zero() {
                Duration::from_secs(10)
            } else {
                decl.decay.0
            },
        }
    }

    /// Counts, percentages and timeouts that parse but make no sense:
    /// refused with the reason rather than clamped in silence.
    fn cluster_counts(&mut self, name: &str, decl: &schema::ClusterDecl) {
        let mut bad: Vec<(&str, String)> = Vec::new();
        if decl.connect_timeout.0.is_zero() {
            bad.push((
                "connect_timeout",
                "connect_timeout must be more than 0".into(),
            ));
        }
        if let Some(h) = &decl.health {
            if h.timeout.0.is_zero() {
                bad.push(("health", "health.timeout must be more than 0".into()));
            }
            if h.unhealthy == 0 || h.healthy == 0 {
                bad.push((
                    "health",
                    "health.unhealthy and health.healthy must be at least 1".into(),
                ));
            }
        }
        if let Some(o) = &decl.outlier {
            if o.consecutive_failures == 0 {
                bad.push((
                    "outlier",
                    "outlier.consecutive_failures must be at least 1".into(),
                ));
            }
            if o.max_ejection_percent > 100 {
                bad.push((
                    "outlier",
                    format!(
                        "outlier.max_ejection_percent = {} is more than 100",
                        o.max_ejection_percent
                    ),
                ));
            }
        }
        if let Some(list) = &decl.endpoints {
            let total = list.get_ref().iter().try_fold(0u32, |sum, ep| match ep {
                schema::EndpointDecl::Address(_) => sum.checked_add(1),
                schema::EndpointDecl::Weighted { weight, .. } => sum.checked_add(*weight),
            });
            if total.is_none() {
                self.at(
                    Some(list.span()),
                    format!(
                        "cluster \"{name}\": the endpoint weights add up to more than {}",
                        u32::MAX
                    ),
                );
            }
        }
        for (key, b) in bad {
            self.at_key(
                &format!("clusters.{name}"),
                Some(key),
                format!("cluster \"{name}\": {b}"),
            );
        }
    }

    fn discovery(&mut self, name: &str, decl: &toml::Spanned<schema::DiscoveryDecl>) -> Discovery {
        let span = Some(decl.span());
        let d = decl.get_ref();
        let sources = [d.dns.is_some(), d.srv.is_some(), d.file.is_some()];
        if sources.iter().filter(|s| **s).count() != 1 {
            self.at(
                span,
                format!(
                    "cluster \"{name}\": discovery needs exactly one of `dns`, `srv` or `file`"
                ),
            );
            return Discovery::Static;
        }
        if let Some(file) = &d.file {
            let dns_keys = d.port.is_some()
                || d.refresh.is_some()
                || d.min_refresh.is_some()
                || d.max_refresh.is_some()
                || d.nameserver.is_some();
            if dns_keys {
                self.at(
                    span.clone(),
                    format!("cluster \"{name}\": port, refresh and nameserver belong to DNS discovery, not to `file`"),
                );
            }
            // Read when the snapshot is compiled.
            return Discovery::File(self.file(file));
        }
        let (host, srv) = match (&d.dns, &d.srv) {
            (Some(h), _) => (h.clone(), false),
            (_, Some(s)) => (s.clone(), true),
            _ => return Discovery::Static,
        };
        let port = match (srv, d.port) {
            (false, Some(0)) => {
                self.at(
                    span.clone(),
                    format!("cluster \"{name}\": discovery port must not be 0"),
                );
                0
            }
            (false, Some(p)) => p,
            (false, None) => {
                self.at(
                    span.clone(),
                    format!("cluster \"{name}\": discovery with `dns` needs `port`"),
                );
                0
            }
            (true, Some(_)) => {
                self.at(
                    span.clone(),
                    format!("cluster \"{name}\": SRV records carry their ports; remove `port`"),
                );
                0
            }
            (true, None) => 0,
        };
        let nameserver = match &d.nameserver {
            Some(ns) => match discovery::parse_nameserver(ns) {
                Ok(a) => Some(a),
                Err(e) => {
                    self.at(span.clone(), format!("cluster \"{name}\": discovery: {e}"));
                    None
                }
            },
            None => None,
        };
        let refresh = d.refresh.map_or(discovery::DEFAULT_REFRESH, |r| r.0);
        let min_refresh = d
            .min_refresh
            .map_or(discovery::DEFAULT_MIN_REFRESH.min(refresh), |r| r.0);
        let max_refresh = d.max_refresh.map_or(refresh, |r| r.0);
        if refresh.is_zero() || min_refresh.is_zero() || max_refresh < min_refresh {
            self.at(
                span,
                format!("cluster \"{name}\": discovery needs refresh > 0 and 0 < min_refresh <= max_refresh"),
            );
        }
        Discovery::Dns(DnsSettings {
            name: host,
            srv,
            port,
            refresh,
            min_refresh: min_refresh.max(Duration::from_millis(10)),
            max_refresh: max_refresh.max(Duration::from_millis(10)),
            nameserver,
        })
    }

    fn hash_key(
        &mut self,
        name: &str,
        decl: &toml::Spanned<schema::HashKeyDecl>,
    ) -> Option<HashKey> {
        let k = decl.get_ref();
        let set = [k.header.is_some(), k.cookie.is_some(), k.source_ip];
        if set.iter().filter(|s| **s).count() != 1 {
            self.at(
                Some(decl.span()),
                format!("cluster \"{name}\": hash_key needs exactly one of `header`, `cookie` or `source_ip = true`"),
            );
            return None;
        }
        if let Some(h) = &k.header {
            return match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => Some(HashKey::Header(n)),
                Err(_) => {
                    self.at(
                        Some(decl.span()),
                        format!("cluster \"{name}\": hash_key header \"{h}\" is not a valid header name"),
                    );
                    None
                }
            };
        }
        if let Some(c) = &k.cookie {
            return Some(HashKey::Cookie(c.clone()));
        }
        Some(HashKey::SourceIp)
    }
}

fn balance_name(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::Random => "random",
        Balance::LeastRequest => "least_request",
        Balance::PeakEwma => "peak_ewma",
        Balance::RingHash => "ring_hash",
        Balance::Maglev => "maglev",
    }
}

fn health_settings(d: &schema::HealthDecl) -> Result<HealthSettings, String> {
    if !d.path.starts_with('/') {
        return Err(format!("health.path \"{}\" must start with /", d.path));
    }
    if d.interval.0.is_zero() {
        return Err("health.interval must be more than 0".into());
    }
    Ok(HealthSettings {
        path: d.path.clone(),
        interval: d.interval.0,
        timeout: d.timeout.0,
        unhealthy: d.unhealthy.max(1),
        healthy: d.healthy.max(1),
    })
}
