//! The TOML schema exactly as users write it (see `config-reference.toml`).
//!
//! Every table denies unknown keys so a typo is an error with a position, not
//! a silently ignored setting. Defaults live here and only here. Names that
//! refer to other sections (clusters, filters) are `Spanned` so validation can
//! point at them. Sections that later features own are deliberately absent
//! until they are implemented: writing them is an error, never a no-op.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::{Dur, Size};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub log: LogSection,
    /// OpenTelemetry trace export; absent: tracing is off.
    pub tracing: Option<Spanned<TracingSection>>,
    #[serde(default)]
    pub filters: BTreeMap<String, FilterDecl>,
    #[serde(default)]
    pub listeners: Vec<ListenerDecl>,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterDecl>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    pub filters_dir: String,
    pub module_cache: String,
    /// Which compiler turns filter modules into machine code (restart-only).
    pub wasm_compiler: WasmCompiler,
    /// Longest one filter module's compile may take (it runs in a child
    /// process, killed after this); hot-reloadable.
    pub wasm_compile_timeout: Dur,
    /// The compile child's heap limit (`RLIMIT_DATA`); hot-reloadable.
    pub wasm_compile_memory: Size,
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
            wasm_compiler: WasmCompiler::Auto,
            wasm_compile_timeout: Dur(std::time::Duration::from_secs(60)),
            wasm_compile_memory: Size(1 << 30),
            drain_timeout: Dur(std::time::Duration::from_secs(30)),
            drain_delay: Dur(std::time::Duration::ZERO),
        }
    }
}

/// `[proxy] wasm_compiler`: `auto` starts a filter on Winch (compiles in
/// one pass, so a new or reloaded filter serves within milliseconds) and
/// moves it to Cranelift (faster code) once a background compile is done;
/// `winch` and `cranelift` use one compiler only.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WasmCompiler {
    #[default]
    Auto,
    Winch,
    Cranelift,
}

/// `[admin]`: the admin API (see `admin/`). `bind` and `probes` are
/// restart-only (their sockets live as long as the process); `token` is
/// hot-reloadable.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Every endpoint; loopback by default.
    pub bind: Spanned<String>,
    /// A second address serving only `/live`, `/ready` and `/metrics`, for
    /// the kubelet and Prometheus (Istio uses 15021).
    pub probes: Option<Spanned<String>>,
    /// Bearer token for the guarded endpoints; when set, every caller
    /// (loopback too) must send `Authorization: Bearer <token>`.
    pub token: Option<Spanned<Secret>>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            bind: Spanned::new(0..0, "127.0.0.1:9901".into()),
            probes: None,
            token: None,
        }
    }
}

/// A value that `/config` must not show (it is the config after `${VAR}`
/// substitution): serialised as `"<redacted>"`, and `Debug` hides it too.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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

// ---- tracing ----------------------------------------------------------------

/// `[tracing]`: spans exported over OTLP. Restart-only: the exporter and its
/// thread are set up once at start-up.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// `http://host:port` of the collector (gRPC), or its `/v1/traces` URL (HTTP).
    pub otlp_endpoint: Spanned<String>,
    #[serde(default)]
    pub protocol: TraceProtocol,
    /// Share of new traces (no sampled parent) that are recorded, 0.0..=1.0.
    /// Requests with a parent follow the parent's sampled flag.
    pub sample_ratio: Option<Spanned<f64>>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "wasp".into()
}

/// OTLP transport: gRPC (port 4317 by convention) or HTTP/protobuf (4318).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TraceProtocol {
    #[default]
    Grpc,
    Http,
}

// ---- filters ----------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterLimits {
    /// CPU time one callback may use.
    pub cpu: Dur,
    /// Linear memory one VM may grow to.
    pub memory: Size,
    /// Entries a filter may grow a header or trailer map to.
    pub headers: usize,
    /// Bytes (names plus values) a filter may grow a header map to.
    pub header_bytes: Size,
    /// Log bytes one callback may write (`proxy_log`, stdout, stderr).
    pub log_bytes: Size,
    /// Shared data of the filter (keys plus values, all workers).
    pub shared_data: Size,
    /// Shared-data keys of the filter.
    pub shared_data_keys: usize,
    /// Shared queues the filter may register.
    pub queues: usize,
    /// Items one shared queue holds.
    pub queue_depth: usize,
    /// Bytes one shared queue holds.
    pub queue_bytes: Size,
    /// Metrics the filter may define.
    pub metrics: usize,
    /// `http_call`s of the filter in flight, all workers together.
    pub callouts: usize,
    /// Most instances of the filter per worker serving streams (one per
    /// in-flight stream, reused across streams; the root instance is extra).
    pub instances: u32,
    /// Shortest tick period a filter may set.
    pub tick_min: Dur,
    /// CPU time per second root-context callbacks may use on one worker.
    pub root_cpu: Dur,
}

impl Default for FilterLimits {
    fn default() -> Self {
        use super::filter::HostLimits as H;
        let size = |n: usize| Size(n as u64);
        Self {
            cpu: Dur(std::time::Duration::from_millis(50)),
            memory: Size(64 << 20),
            headers: H::DEFAULT_HEADERS,
            header_bytes: size(H::DEFAULT_HEADER_BYTES),
            log_bytes: size(H::DEFAULT_LOG_BYTES),
            shared_data: size(H::DEFAULT_SHARED_DATA),
            shared_data_keys: H::DEFAULT_SHARED_DATA_KEYS,
            queues: H::DEFAULT_QUEUES,
            queue_depth: H::DEFAULT_QUEUE_DEPTH,
            queue_bytes: size(H::DEFAULT_QUEUE_BYTES),
            metrics: H::DEFAULT_METRICS,
            callouts: H::DEFAULT_CALLOUTS,
            instances: 16,
            tick_min: Dur(std::time::Duration::from_millis(100)),
            root_cpu: Dur(std::time::Duration::from_millis(100)),
        }
    }
}

impl FilterLimits {
    /// The engine's host-call caps (sizes past `usize` saturate).
    pub fn host_limits(&self) -> super::filter::HostLimits {
        let size = |s: Size| usize::try_from(s.0).unwrap_or(usize::MAX);
        super::filter::HostLimits {
            headers: self.headers,
            header_bytes: size(self.header_bytes),
            log_bytes: size(self.log_bytes),
            shared_data: size(self.shared_data),
            shared_data_keys: self.shared_data_keys,
            queues: self.queues,
            queue_depth: self.queue_depth,
            queue_bytes: size(self.queue_bytes),
            metrics: self.metrics,
            callouts: self.callouts,
        }
    }
}

// ---- listeners and routes ------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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
    /// Peers whose `x-forwarded-proto`, `-host` and `forwarded` headers are
    /// kept: CIDRs (`"10.0.0.0/8"`) or single addresses. Everyone else's
    /// are replaced (proto) or dropped (host, forwarded).
    #[serde(default)]
    pub trust_forwarded: Vec<Spanned<String>>,
    /// `http` (the default) or `tcp`: an L4 listener copies bytes both
    /// ways to the cluster its TCP routes pick (by destination port, CIDR
    /// or TLS SNI).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// A capture listener receives connections iptables redirected to it
    /// (`wasp iptables`) and reads where they were going
    /// (`SO_ORIGINAL_DST`): `outbound` for the app's calls, `inbound` for
    /// calls to the app.
    pub capture: Option<Spanned<CaptureMode>>,
    /// On a capture listener: tell HTTP/1, HTTP/2 and TLS apart from the
    /// first bytes (else everything is opaque TCP to the original
    /// destination).
    #[serde(default = "yes")]
    pub detect_protocol: bool,
    /// Original destination ports whose connections skip detection and go
    /// straight to L4 (server-speaks-first protocols: MySQL, SMTP, ...).
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
}

fn yes() -> bool {
    true
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    #[default]
    Http,
    Tcp,
}

/// Which side of the pod a capture listener receives.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    Outbound,
    Inbound,
}

/// `tls = { cert, key, client_ca, allow, certs, min_version }` on a listener.
/// Paths are relative to the config file. Hot-reloadable: the files reload
/// when they change, and a config reload applies the table to new
/// connections (open ones keep what they negotiated).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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
    /// A request's stream with no bytes either way for this long is cut:
    /// 408 before its response started, else reset. "0s" turns it off.
    pub stream_idle_timeout: Dur,
    /// The whole request (head and body) must arrive within this long;
    /// "0s" (the default) turns it off.
    pub request_timeout: Dur,
    /// HTTP/2 PING after this long without a frame from the peer; "0s"
    /// turns keepalive pings off.
    pub h2_keepalive_interval: Dur,
    /// An HTTP/2 connection whose PING is not answered within this long is
    /// closed.
    pub h2_keepalive_timeout: Dur,
    /// A proxied TCP connection (L4 listener, opaque or TLS passthrough on
    /// a capture listener) with no byte either way for this long is closed
    /// (Envoy's tcp_proxy `idle_timeout`). "0s" turns it off.
    pub tcp_idle_timeout: Dur,
    /// How long a capture listener waits for a silent client's first bytes
    /// before taking the connection for opaque TCP (server-speaks-first
    /// protocols; list their ports in `opaque_ports` to skip the wait).
    pub detect_timeout: Dur,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: Size(64 << 10),
            max_body_bytes: Size(16 << 20),
            header_timeout: Dur(std::time::Duration::from_secs(10)),
            idle_timeout: Dur(std::time::Duration::from_secs(60)),
            stream_idle_timeout: Dur(std::time::Duration::from_secs(300)),
            request_timeout: Dur(std::time::Duration::ZERO),
            h2_keepalive_interval: Dur(super::H2_KEEPALIVE_INTERVAL),
            h2_keepalive_timeout: Dur(super::H2_KEEPALIVE_TIMEOUT),
            tcp_idle_timeout: Dur(std::time::Duration::from_secs(3600)),
            detect_timeout: Dur(std::time::Duration::from_millis(500)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDecl {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchDecl,
    pub cluster: Option<Spanned<String>>,
    pub clusters: Option<Vec<WeightedClusterDecl>>,
    /// Whole-request deadline: until the response headers arrive. Absent:
    /// the cluster's `timeout`, else 15 s (as Envoy); "0s" turns it off.
    pub timeout: Option<Dur>,
    /// Replaces the matched `prefix` of the path.
    pub rewrite_prefix: Option<String>,
    /// Replaces the `Host` header sent upstream.
    pub rewrite_host: Option<String>,
    /// Peer identities that may use this route (mTLS listeners only).
    pub allow: Option<Spanned<Vec<String>>>,
    /// Retries of failed tries (replayable requests only).
    pub retry: Option<RetryDecl>,
    /// Replaces the listener's `pipeline` for requests this route matches
    /// (by the headers as the client sent them); `[]` runs no filter.
    pub pipeline: Option<Spanned<Vec<Spanned<String>>>>,
    /// Runs these filters after the listener's `pipeline` on this route.
    pub pipeline_append: Option<Spanned<Vec<Spanned<String>>>>,
    /// Per-filter settings for this route only (`filters.NAME.config`).
    #[serde(default)]
    pub filters: BTreeMap<String, RouteFilterDecl>,
}

/// `filters.NAME` of a route: what changes for that filter on this route.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFilterDecl {
    /// Replaces `[filters.NAME] config` for this route: the filter gets it
    /// in a root context of its own (`proxy_on_configure`).
    pub config: Spanned<toml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
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
    /// TCP routes: the TLS server name of a ClientHello (TLS passthrough);
    /// `*.example.com` matches subdomains.
    pub sni: Option<String>,
    /// TCP routes: the destination port (the original one on a capture
    /// listener, else the listener's).
    pub port: Option<u16>,
    /// TCP routes: the destination address is in this network.
    pub cidr: Option<Spanned<String>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterDecl {
    pub name: Spanned<String>,
    pub weight: u32,
}

// ---- clusters ----------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterDecl {
    /// A static list; exactly one of `endpoints` and `discovery` is set.
    pub endpoints: Option<Spanned<Vec<EndpointDecl>>>,
    /// Where the endpoints come from when they are not listed here.
    pub discovery: Option<Spanned<DiscoveryDecl>>,
    #[serde(default)]
    pub balance: Balance,
    /// Time constant of the `peak_ewma` latency estimate.
    #[serde(default = "default_decay")]
    pub decay: Dur,
    /// What `ring_hash` and `maglev` hash.
    pub hash_key: Option<Spanned<HashKeyDecl>>,
    /// Active HTTP health checks.
    pub health: Option<HealthDecl>,
    /// Passive outlier detection.
    pub outlier: Option<OutlierDecl>,
    /// Circuit breaking.
    #[serde(default)]
    pub limits: ClusterLimitsDecl,
    /// Caps retries to this cluster.
    pub retry_budget: Option<RetryBudgetDecl>,
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
/// cluster. Paths are relative to the config file. Hot-reloadable like the
/// listener's: new upstream connections use the current files and table.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
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

/// `discovery = { dns = "name", port = 80 }`, `{ srv = "_http._tcp.name" }`
/// or `{ file = "endpoints.toml" }`, with refresh bounds for DNS.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryDecl {
    /// A/AAAA records of this name.
    pub dns: Option<String>,
    /// SRV records of this name (targets resolved to A/AAAA).
    pub srv: Option<String>,
    /// A watched TOML or JSON file listing `{ address, weight }`.
    pub file: Option<String>,
    /// The port for `dns` (SRV records carry their own).
    pub port: Option<u16>,
    /// Re-resolve interval when the answer has no usable TTL.
    pub refresh: Option<Dur>,
    /// Bounds on the TTL-driven re-resolve interval.
    pub min_refresh: Option<Dur>,
    pub max_refresh: Option<Dur>,
    /// `ip:port` of the DNS server; absent: the system's resolv.conf.
    pub nameserver: Option<String>,
}

/// `hash_key = { header = "x-user" }`, `{ cookie = "session" }` or
/// `{ source_ip = true }`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashKeyDecl {
    pub header: Option<String>,
    pub cookie: Option<String>,
    #[serde(default)]
    pub source_ip: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthDecl {
    /// Path of the HTTP GET; any 2xx is healthy.
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
    /// Consecutive failures that mark an endpoint unhealthy.
    #[serde(default = "default_unhealthy")]
    pub unhealthy: u32,
    /// Consecutive successes that mark it healthy again.
    #[serde(default = "default_healthy")]
    pub healthy: u32,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDecl {
    /// Consecutive 5xx answers or connect failures/resets that eject.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Ejection time; the n-th ejection of an endpoint lasts n times this.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    /// At most this share of the endpoints is ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLimitsDecl {
    /// Open connections to the cluster (all workers together).
    pub max_connections: Option<usize>,
    /// Requests waiting for the upstream's response headers.
    pub max_pending: Option<usize>,
    /// Requests in flight to the cluster.
    pub max_requests: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetDecl {
    /// Retries may add this share of the requests.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the ratio says.
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
}

/// `retry = { on = [...], attempts = 2, per_try_timeout = "500ms" }` on a route.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDecl {
    pub on: Vec<RetryOn>,
    /// Retries after the first try.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    pub per_try_timeout: Option<Dur>,
    /// Base of the jittered exponential backoff between tries.
    #[serde(default = "default_backoff")]
    pub backoff: Dur,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection could not be made.
    ConnectFailure,
    /// The connection closed or reset before the response headers.
    Reset,
    /// Any 5xx answer, and a per-try timeout.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504, and a per-try timeout.
    GatewayError,
}

fn default_decay() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_health_interval() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_health_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_unhealthy() -> u32 {
    3
}
fn default_healthy() -> u32 {
    2
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_max_ejection_percent() -> u32 {
    50
}
fn default_min_per_second() -> u32 {
    10
}
fn default_attempts() -> u32 {
    2
}
fn default_backoff() -> Dur {
    Dur(std::time::Duration::from_millis(25))
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

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EndpointDecl {
    Address(String),
    Weighted { address: String, weight: u32 },
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    Random,
    LeastRequest,
    #[default]
    PeakEwma,
    RingHash,
    Maglev,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}
