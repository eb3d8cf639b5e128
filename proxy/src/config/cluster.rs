//! A cluster's upstream settings as plain data: discovery, hash key,
//! health checks, outlier detection, circuit-breaker limits and the retry
//! policy of routes. `upstream` acts on them; nothing here runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;

/// What `ring_hash` and `maglev` hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
}

/// Circuit-breaker caps; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<usize>,
    pub max_pending: Option<usize>,
    pub max_requests: Option<usize>,
}

/// The typed cluster settings `upstream` acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSettings {
    pub discovery: Discovery,
    pub hash_key: Option<HashKey>,
    pub health: Option<HealthSettings>,
    pub outlier: Option<OutlierSettings>,
    pub limits: Limits,
    /// Peak-EWMA time constant.
    pub decay: Duration,
}

/// Where a cluster's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    Static,
    Dns(DnsSettings),
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    pub name: String,
    /// SRV records (with their own ports and weights) rather than A/AAAA.
    pub srv: bool,
    /// The port of every A/AAAA address.
    pub port: u16,
    /// Interval when the answer carries no TTL, and after failures.
    pub refresh: Duration,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    /// Absent: the system's resolver configuration.
    pub nameserver: Option<SocketAddr>,
}

/// Defaults of the DNS refresh bounds.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(1);

/// `ip:port` for a DNS server setting.
pub fn parse_nameserver(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("nameserver \"{text}\" is not an ip or ip:port"))
}

/// Active health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy: u32,
    pub healthy: u32,
}

/// Passive outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// What a route retries, how often, and how fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub connect_failure: bool,
    pub reset: bool,
    pub five_xx: bool,
    pub gateway_error: bool,
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Duration,
}
