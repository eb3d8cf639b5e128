//! The TOML schema exactly as users write it (see `config-reference.toml`).
//!
//! Every table denies unknown keys so a typo is an error with a position, not
//! a silently ignored setting. Defaults live here and only here. Names that
//! refer to other sections (clusters, filters) are `Spanned` so validation can
//! point at them. Sections that later features own (discovery, health)
//! are deliberately absent until they are implemented: writing them is an
//! error, never a no-op.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::{Dur, Size};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub filters: BTreeMap<String, FilterDecl>,
    #[serde(default)]
    pub listeners: Vec<ListenerDecl>,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterDecl>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    pub filters_dir: String,
    pub module_cache: String,
    /// Longest a graceful shutdown waits for in-flight requests.
    pub drain_timeout: Dur,
    /// How long inbound keeps serving after SIGTERM before draining.
    pub drain_delay: Dur,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            workers: 0,
            filters_dir: "filters.d".into(),
            module_cache: ".wasp-cache".into(),
            drain_timeout: Dur(std::time::Duration::from_secs(30)),
            drain_delay: Dur(std::time::Duration::ZERO),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub bind: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9901".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: LogLevel,
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: LogLevel::Info,
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

// ---- filters ----------------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterDecl {
    /// File name inside `filters_dir`.
    pub module: String,
    #[serde(default)]
    pub fail: FailMode,
    /// Handed to `proxy_on_configure`: a table becomes JSON, a string is passed as is.
    pub config: Option<toml::Value>,
    /// Handed to `proxy_on_vm_start`.
    pub vm_config: Option<toml::Value>,
    #[serde(default)]
    pub limits: FilterLimits,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    #[default]
    Closed,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterLimits {
    /// CPU time one callback may use.
    pub cpu: Dur,
    /// Linear memory one VM may grow to.
    pub memory: Size,
}

impl Default for FilterLimits {
    fn default() -> Self {
        Self {
            cpu: Dur(std::time::Duration::from_millis(50)),
            memory: Size(64 << 20),
        }
    }
}

// ---- listeners and routes ------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerDecl {
    pub name: String,
    pub bind: Spanned<String>,
    #[serde(default)]
    pub pipeline: Vec<Spanned<String>>,
    #[serde(default)]
    pub limits: ListenerLimits,
    /// TLS termination; absent: plaintext.
    pub tls: Option<Spanned<ListenerTlsDecl>>,
    #[serde(default)]
    pub routes: Vec<RouteDecl>,
}

/// `tls = { cert, key, client_ca, allow, certs, min_version }` on a listener.
/// Paths are relative to the config file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsDecl {
    /// Default certificate chain (PEM), served when no `certs` entry matches the SNI.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// CA bundle (PEM); when set, clients must present a certificate it issued.
    pub client_ca: Option<String>,
    /// Peer identities (URI SAN, else DNS SAN) that may call; `prefix*`
    /// matches a prefix. Absent: any peer the TLS settings let in.
    pub allow: Option<Vec<String>>,
    /// More certificates chosen by SNI.
    #[serde(default)]
    pub certs: Vec<SniCertDecl>,
    #[serde(default)]
    pub min_version: TlsVersion,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertDecl {
    /// Host name, or `*.example.com` for any subdomain.
    pub sni: String,
    pub cert: String,
    pub key: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// Concurrent downstream connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request line plus headers.
    pub max_header_bytes: Size,
    /// Request body; larger ones get 413.
    pub max_body_bytes: Size,
    /// Time to receive a complete request head once it has started; 408 after.
    pub header_timeout: Dur,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Dur,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: Size(64 << 10),
            max_body_bytes: Size(16 << 20),
            header_timeout: Dur(std::time::Duration::from_secs(10)),
            idle_timeout: Dur(std::time::Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDecl {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchDecl,
    pub cluster: Option<Spanned<String>>,
    pub clusters: Option<Vec<WeightedClusterDecl>>,
    /// Whole-request deadline: until the response headers arrive.
    pub timeout: Option<Dur>,
    /// Replaces the matched `prefix` of the path.
    pub rewrite_prefix: Option<String>,
    /// Replaces the `Host` header sent upstream.
    pub rewrite_host: Option<String>,
    /// Peer identities that may use this route (mTLS listeners only).
    pub allow: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchDecl {
    /// Host without port, case-insensitive; `*.example.com` matches subdomains.
    pub host: Option<String>,
    pub prefix: Option<String>,
    pub path: Option<String>,
    pub regex: Option<Spanned<String>>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterDecl {
    pub name: Spanned<String>,
    pub weight: u32,
}

// ---- clusters ----------------------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterDecl {
    pub endpoints: Spanned<Vec<EndpointDecl>>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Deadline for the response headers when the route sets none.
    pub timeout: Option<Dur>,
    /// Idle upstream connections are closed after this long.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: Dur,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// TLS towards the endpoints; absent: plaintext.
    pub tls: Option<Spanned<ClusterTlsDecl>>,
}

/// `tls = { ca, cert, key, sni, expect_identity, insecure_skip_verify }` on a
/// cluster. Paths are relative to the config file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsDecl {
    /// CA bundle (PEM) to verify endpoints against; absent: the webpki roots.
    pub ca: Option<String>,
    /// Client certificate chain and key (PEM) for mTLS.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Server name sent and verified; absent: the endpoint's address.
    pub sni: Option<String>,
    /// URI or DNS SAN the endpoint's certificate must carry (replaces the
    /// host name check).
    pub expect_identity: Option<String>,
    /// Turns verification off. Never in production.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_connect_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}

fn default_pool_idle() -> Dur {
    Dur(std::time::Duration::from_secs(90))
}

fn default_pool_max_idle() -> usize {
    64
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EndpointDecl {
    Address(String),
    Weighted { address: String, weight: u32 },
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}
