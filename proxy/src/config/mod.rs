//! Configuration: reading the TOML file, `${VAR}` interpolation, validation,
//! and the immutable typed [`Config`] the rest of the proxy runs from.
//!
//! Plain data only: every type here is `Clone + PartialEq` (so a reload
//! tells "unchanged" with `==`), and nothing here resolves a name, loads a
//! certificate or allocates runtime state. The `snapshot` module compiles
//! a `Config` into what the workers serve from (route matchers, TLS
//! material, resolved endpoints, cluster state); the problems it finds
//! point into the file through the [`Site`]s kept here.
//!
//! Loading never half-succeeds: every problem found is collected and
//! reported together, each with the file, line and column it comes from,
//! and nothing is applied unless all is well.

pub mod cluster;
pub mod filter;
mod interpolate;
pub mod l4;
pub mod route;
pub mod schema;
pub mod tls;
pub mod trust;
pub mod units;
mod upstream;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use cluster::{ClusterSettings, Discovery, RetryPolicy};
pub use l4::{L4Config, TcpMatch};
pub use route::{RouteConfig, RouteFilters};
pub use schema::{
    Balance, CaptureMode, FailMode, ListenerProtocol, LogFormat, LogLevel, TraceProtocol,
    UpstreamProtocol,
};
pub use tls::{Allow, ClientTlsSettings, ServerTlsSettings};

use tls::{CertPaths, MinVersion, SniCert};

/// The validated configuration. Cheap to share: held in an `Arc` by snapshots.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    /// The file as parsed (after interpolation), defaults filled in; `/config` shows it.
    pub file: schema::File,
    pub workers: usize,
    pub admin: AdminConfig,
    pub filters_dir: PathBuf,
    pub module_cache: PathBuf,
    pub wasm_compiler: schema::WasmCompiler,
    /// `[proxy] wasm_compile_timeout`: wall-clock limit of one module's
    /// compile (never zero).
    pub wasm_compile_timeout: Duration,
    /// `[proxy] wasm_compile_memory`: the compile child's heap, in bytes
    /// (at least [`MIN_COMPILE_MEMORY`]).
    pub wasm_compile_memory: u64,
    pub drain_timeout: Duration,
    pub drain_delay: Duration,
    pub listeners: Vec<ListenerConfig>,
    /// Indexed by cluster id (the position in this vector).
    pub clusters: Vec<ClusterConfig>,
    /// `[tracing]`; `None`: no spans are made at all.
    pub tracing: Option<TracingConfig>,
}

/// `[admin]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Every endpoint (restart-only).
    pub bind: SocketAddr,
    /// Only `/live`, `/ready`, `/metrics` (restart-only).
    pub probes: Option<SocketAddr>,
    /// Required from every caller of a guarded endpoint when set
    /// (hot-reloadable).
    pub token: Option<Arc<str>>,
}

/// Shortest admin token accepted: guessing must not be practical.
pub const MIN_ADMIN_TOKEN: usize = 16;
/// Least `[proxy] wasm_compile_memory`: a typo guard. The child needs
/// ~10 MiB of heap for a 140 KB module (Winch or Cranelift, measured with
/// `ulimit -d`), so this much only fails compiles, it cannot wedge anything.
pub const MIN_COMPILE_MEMORY: u64 = 4 << 20;
/// Most worker threads: more is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;
/// Most connections one listener may be told to hold.
pub const MAX_LISTENER_CONNECTIONS: usize = 10_000_000;

/// Where spans go and how many are kept (`[tracing]`, validated).
#[derive(Clone, Debug, PartialEq)]
pub struct TracingConfig {
    /// The full export URL: `http://host:port` for gRPC, `.../v1/traces` for HTTP.
    pub endpoint: String,
    pub protocol: TraceProtocol,
    /// 0.0..=1.0, for traces that start here.
    pub sample_ratio: f64,
    pub service_name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    pub pipeline: Vec<Arc<str>>,
    pub limits: ListenerLimits,
    /// In file order (the first match wins).
    pub routes: Vec<RouteConfig>,
    /// TLS termination, loaded when a snapshot is compiled.
    pub tls: Option<ServerTlsSettings>,
    /// Peer identities that may call this listener (`tls.allow`).
    pub allow: Option<Allow>,
    /// Peers whose forwarded headers are kept (`trust_forwarded`).
    pub trust_forwarded: trust::TrustedPeers,
    /// The `tls` table, for problems found loading it.
    pub tls_site: Site,
    /// TCP-level settings: L4 listeners and capture (`l4` and `capture`
    /// act on them).
    pub l4: L4Config,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: off ("0s").
    pub stream_idle_timeout: Option<Duration>,
    /// `None`: off ("0s", the default).
    pub request_timeout: Option<Duration>,
    /// `None`: no HTTP/2 keepalive pings ("0s").
    pub h2_keepalive_interval: Option<Duration>,
    pub h2_keepalive_timeout: Duration,
}

/// HTTP/2 keepalive defaults (listener limits `h2_keepalive_interval`,
/// `h2_keepalive_timeout`): a PING after this long without a frame from the
/// peer (idle connections too), and the connection is closed when the
/// answer takes longer than the timeout. The timeout is generous because a
/// PING queues behind the response bytes already in the send buffer: a
/// healthy client downloading slowly must not be taken for a dead one (a
/// client that stopped reading is the guard's, `stream_idle_timeout` after
/// its writes stopped). The same values apply towards h2 upstreams
/// (`upstream`).
pub const H2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
pub const H2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A route's deadline for the response headers when neither it nor its
/// cluster sets one (Envoy's default).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// The deadline for the response headers: the route's `timeout`, else the
/// cluster's, else [`DEFAULT_ROUTE_TIMEOUT`]; zero turns it off.
pub fn route_timeout(route: Option<Duration>, cluster: Option<Duration>) -> Option<Duration> {
    let t = route.or(cluster).unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    (!t.is_zero()).then_some(t)
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub name: Arc<str>,
    /// The static list as written; empty with discovery. Names are
    /// resolved when a snapshot is compiled.
    pub endpoints: Vec<EndpointAddress>,
    pub balance: Balance,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub timeout: Option<Duration>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// TLS towards the endpoints, loaded when a snapshot is compiled.
    pub tls: Option<ClientTlsSettings>,
    /// Discovery, hash key, health, outlier and circuit-breaker settings.
    pub settings: ClusterSettings,
    pub retry_budget: Option<schema::RetryBudgetDecl>,
    /// Where problems found compiling this cluster point.
    pub sites: ClusterSites,
}

/// An endpoint as written: `ip:port` or `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAddress {
    pub addr: String,
    pub weight: u32,
}

/// A resolved endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// A position in the config file as written (1-based; 0: none), kept for
/// problems found after validation (resolving, loading certificates).
/// Never part of a value's identity: every `Site` equals every other, so
/// moving a section in the file does not make it "changed".
#[derive(Clone, Copy, Debug, Default)]
pub struct Site {
    pub line: usize,
    pub column: usize,
}

impl PartialEq for Site {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Site {
    /// A problem at this site.
    pub fn problem(self, message: String) -> Problem {
        Problem {
            line: self.line,
            column: self.column,
            message,
        }
    }
}

/// The places of a cluster's `endpoints`, `discovery` and `tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClusterSites {
    pub endpoints: Site,
    pub discovery: Site,
    pub tls: Site,
}

/// What only a restart can change: the worker threads and the admin
/// sockets live as long as the process, and so do the trace exporter and
/// the Wasm engines (the compiler is an engine setting).
#[derive(Debug, PartialEq)]
pub struct RestartOnly<'a> {
    pub workers: usize,
    pub wasm_compiler: schema::WasmCompiler,
    pub admin_bind: SocketAddr,
    pub admin_probes: Option<SocketAddr>,
    pub tracing: Option<&'a TracingConfig>,
}

impl Config {
    pub fn restart_only(&self) -> RestartOnly<'_> {
        RestartOnly {
            workers: self.workers,
            wasm_compiler: self.wasm_compiler,
            admin_bind: self.admin.bind,
            admin_probes: self.admin.probes,
            tracing: self.tracing.as_ref(),
        }
    }

    /// The problems of this config as a [`ConfigError`] of its file.
    pub fn error(&self, problems: Vec<Problem>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            problems,
        }
    }
}

/// Everything wrong with a config file, each with its position.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
pub struct Problem {
    /// 1-based; 0 when the problem has no single place in the file.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Reads, interpolates, parses and validates `path` with the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, |name| std::env::var(name).ok())
}

pub fn load_with_env(
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError {
        file: path.to_path_buf(),
        problems,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(vec![Problem {
            line: 0,
            column: 0,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    parse(path, &text, env).map_err(fail)
}

/// Parses config text as if it came from `path` (relative paths resolve beside it).
pub fn parse(
    path: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Problem>> {
    let source = text;
    let (text, map) = interpolate::interpolate_mapped(text, env).map_err(|unset| {
        let (line, column) = line_col(text, unset.offset);
        let message = if unset.unquotable {
            format!(
                "environment variable {} holds a quote or line break, which cannot go into a '...' string; use a \"...\" string (referenced as ${{{}}})",
                unset.name, unset.name
            )
        } else {
            format!(
                "environment variable {} is not set (referenced as ${{{}}})",
                unset.name, unset.name
            )
        };
        vec![Problem {
            line,
            column,
            message,
        }]
    })?;
    let file: schema::File = toml::from_str(&text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| line_col(source, map.source(s.start)))
            .unwrap_or((0, 0));
        vec![Problem {
            line,
            column,
            // toml leaves the message empty for some truncated files.
            message: match e.message().trim() {
                "" => "malformed TOML here: a value, quote or bracket is missing".to_string(),
                m => m.to_string(),
            },
        }]
    })?;
    Validator::new(source, map, path).run(file)
}

/// Converts a byte offset into a 1-based line and column.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // An offset inside a character counts from the character's start.
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The offset of `key = ...` in section `[table]` of `text` (or of the
/// section header when `key` is absent or not found there).
fn find_key(text: &str, table: &str, key: Option<&str>) -> Option<usize> {
    let mut offset = 0;
    let mut header = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('[') {
            if header.is_some() {
                break;
            }
            let name = trimmed
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("");
            let unquoted: String = name
                .chars()
                .filter(|c| !matches!(c, '"' | '\'' | ' '))
                .collect();
            if unquoted == table {
                header = Some(offset + indent);
            }
        } else if let (Some(_), Some(key)) = (header, key) {
            if let Some(rest) = trimmed.strip_prefix(key) {
                if rest.trim_start().starts_with(['=', '.']) {
                    return Some(offset + indent);
                }
            }
        }
        offset += line.len();
    }
    header
}

// === impl ConfigError ===

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {} problem{} in the configuration",
            self.file.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.line > 0 {
                writeln!(
                    f,
                    "  {}:{}:{}: {}",
                    self.file.display(),
                    p.line,
                    p.column,
                    p.message
                )?;
            } else {
                writeln!(f, "  {}: {}", self.file.display(), p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === Validator ===

/// Turns the raw schema into a [`Config`], collecting every problem.
struct Validator<'a> {
    /// The file as written; spans are in the interpolated text and go
    /// through `map` first.
    text: &'a str,
    map: interpolate::OffsetMap,
    path: &'a Path,
    problems: Vec<Problem>,
    /// Each filter's distinct `filters.NAME.config` values so far (every
    /// one is a root context in every instance of the filter: capped).
    route_configs: std::collections::BTreeMap<String, Vec<toml::Value>>,
}

impl<'a> Validator<'a> {
    fn new(text: &'a str, map: interpolate::OffsetMap, path: &'a Path) -> Self {
        Self {
            text,
            map,
            path,
            route_configs: Default::default(),
            problems: Vec::new(),
        }
    }

    /// The position of `span` in the file as written.
    fn site(&self, span: Range<usize>) -> Site {
        let (line, column) = line_col(self.text, self.map.source(span.start));
        Site { line, column }
    }

    fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, self.map.source(s.start)));
        self.problems.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }

    /// For keys the schema does not keep spans of: the line of `key` inside
    /// the `[table]` section as written (else the section's header, else no
    /// position). A lookup in the text, so a table written inline or
    /// dotted elsewhere falls back to no position.
    fn at_key(&mut self, table: &str, key: Option<&str>, message: impl Into<String>) {
        let offset = find_key(self.text, table, key);
        let (line, column) = offset.map_or((0, 0), |o| line_col(self.text, o));
        self.problems.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }

    /// Where a route is, for its problems without a span of their own
    /// (found validating or compiling): its `[[listeners.routes]]` header, the `index`-th after the listener's
    /// `bind` (at `listener_at` in the interpolated text), else the listener.
    fn route_site(&self, listener_at: usize, index: usize) -> Site {
        let from = self.map.source(listener_at);
        let offset = self.text.get(from..).and_then(|rest| {
            let end = rest.find("[[listeners]]").unwrap_or(rest.len());
            let within = rest.get(..end)?;
            let found = within.match_indices("[[listeners.routes]]").nth(index)?;
            Some(from + found.0)
        });
        let (line, column) = line_col(self.text, offset.unwrap_or(from));
        Site { line, column }
    }

    /// A problem at the `index`-th route of the listener at `listener_at`.
    fn at_route(&mut self, listener_at: usize, index: usize, message: String) {
        let site = self.route_site(listener_at, index);
        self.problems.push(site.problem(message));
    }

    fn run(mut self, file: schema::File) -> Result<Config, Vec<Problem>> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let admin = self.admin(&file.admin);
        if file.proxy.workers > MAX_WORKERS {
            self.at_key(
                "proxy",
                Some("workers"),
                format!(
                    "[proxy] workers = {} is more than {MAX_WORKERS} (0 means one per core)",
                    file.proxy.workers
                ),
            );
        }

        if file.proxy.wasm_compile_timeout.0.is_zero() {
            self.at_key(
                "proxy",
                Some("wasm_compile_timeout"),
                "[proxy] wasm_compile_timeout must be more than 0s".to_string(),
            );
        }
        if file.proxy.wasm_compile_memory.0 < MIN_COMPILE_MEMORY {
            self.at_key(
                "proxy",
                Some("wasm_compile_memory"),
                format!(
                    "[proxy] wasm_compile_memory = {} bytes is less than 4MiB",
                    file.proxy.wasm_compile_memory.0
                ),
            );
        }

        let clusters = self.clusters(&file);
        let index: HashMap<&str, usize> = clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (&*c.name, i))
            .collect();
        self.filter_limits(&file);
        let listeners = self.listeners(&file, &index);
        let tracing = file.tracing.as_ref().map(|t| self.tracing(t));

        if !self.problems.is_empty() {
            return Err(self.problems);
        }
        let workers = match file.proxy.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Config {
            path: self.path.to_path_buf(),
            workers,
            admin,
            filters_dir: dir.join(&file.proxy.filters_dir),
            module_cache: dir.join(&file.proxy.module_cache),
            wasm_compiler: file.proxy.wasm_compiler,
            wasm_compile_timeout: file.proxy.wasm_compile_timeout.0,
            wasm_compile_memory: file.proxy.wasm_compile_memory.0,
            drain_timeout: file.proxy.drain_timeout.0,
            drain_delay: file.proxy.drain_delay.0,
            listeners,
            clusters,
            tracing,
            file,
        })
    }

    fn admin(&mut self, a: &schema::AdminSection) -> AdminConfig {
        let mut addr =
            |key: &str, v: &toml::Spanned<String>| match v.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.at(
                        Some(v.span()),
                        format!(
                            "[admin] {key} = \"{}\" is not an ip:port address",
                            v.get_ref()
                        ),
                    );
                    None
                }
            };
        let bind = addr("bind", &a.bind).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901)));
        let probes = a.probes.as_ref().and_then(|p| addr("probes", p));
        if let Some(p) = probes {
            if p == bind
                || (p.port() == bind.port()
                    && p.port() != 0
                    && (p.ip().is_unspecified() || bind.ip().is_unspecified()))
            {
                let span = a.probes.as_ref().map(toml::Spanned::span);
                self.at(span, format!("[admin] probes = \"{p}\" overlaps bind = \"{bind}\"; give the probes their own port"));
            }
        }
        let token = a.token.as_ref().and_then(|t| {
            let value = &t.get_ref().0;
            let problem = if value.len() < MIN_ADMIN_TOKEN {
                Some(format!("[admin] token is {} characters long; use at least {MIN_ADMIN_TOKEN} (e.g. `openssl rand -hex 32`)", value.len()))
            } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
                Some("[admin] token must be printable ASCII without spaces (it travels in an Authorization header)".to_string())
            } else {
                None
            };
            match problem {
                Some(message) => {
                    self.at(Some(t.span()), message);
                    None
                }
                None => Some(Arc::from(value.as_str())),
            }
        });
        AdminConfig {
            bind,
            probes,
            token,
        }
    }

    fn tracing(&mut self, decl: &toml::Spanned<schema::TracingSection>) -> TracingConfig {
        let t = decl.get_ref();
        let ratio = t.sample_ratio.as_ref().map_or(1.0, |r| *r.get_ref());
        if !(0.0..=1.0).contains(&ratio) {
            let span = t.sample_ratio.as_ref().map(toml::Spanned::span);
            self.at(
                span,
                format!("[tracing] sample_ratio = {ratio} is not between 0.0 and 1.0"),
            );
        }
        if t.service_name.is_empty() {
            self.at(Some(decl.span()), "[tracing] service_name is empty");
        }
        let raw = t.otlp_endpoint.get_ref();
        let mut endpoint = raw.clone();
        match raw.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => {
                // The HTTP exporter posts to the URL as given; a bare
                // collector address means its standard traces path.
                if t.protocol == TraceProtocol::Http && matches!(uri.path(), "" | "/") {
                    endpoint = format!("http://{}/v1/traces", uri.authority().map_or("", |a| a.as_str()));
                }
            }
            Ok(uri) if uri.scheme_str() == Some("https") => self.at(
                Some(t.otlp_endpoint.span()),
                format!("[tracing] otlp_endpoint = \"{raw}\": https is not supported; export to a local collector over http"),
            ),
            _ => self.at(
                Some(t.otlp_endpoint.span()),
                format!("[tracing] otlp_endpoint = \"{raw}\" is not an http://host:port URL"),
            ),
        }
        TracingConfig {
            endpoint,
            protocol: t.protocol,
            sample_ratio: ratio,
            service_name: t.service_name.clone(),
        }
    }

    fn clusters(&mut self, file: &schema::File) -> Vec<ClusterConfig> {
        let mut out = Vec::with_capacity(file.clusters.len());
        for (name, decl) in &file.clusters {
            let mut endpoints = Vec::new();
            let mut sites = ClusterSites::default();
            if let Some(list) = &decl.endpoints {
                sites.endpoints = self.site(list.span());
                for ep in list.get_ref() {
                    let (address, weight) = match ep {
                        schema::EndpointDecl::Address(a) => (a.as_str(), 1),
                        schema::EndpointDecl::Weighted { address, weight } => {
                            (address.as_str(), *weight)
                        }
                    };
                    // Names are resolved when the snapshot is compiled;
                    // what needs no lookup is checked here.
                    if address.parse::<SocketAddr>().is_err() && !address.contains(':') {
                        self.at(
                            Some(list.span()),
                            format!(
                                "cluster \"{name}\": endpoint \"{address}\": expected host:port"
                            ),
                        );
                    }
                    endpoints.push(EndpointAddress {
                        addr: address.to_string(),
                        weight,
                    });
                }
                if list.get_ref().is_empty() {
                    self.at(
                        Some(list.span()),
                        format!("cluster \"{name}\" has no endpoints"),
                    );
                }
            }
            if let Some(d) = &decl.discovery {
                sites.discovery = self.site(d.span());
            }
            let settings = self.cluster_settings(name, decl);
            let tls = decl.tls.as_ref().and_then(|t| {
                sites.tls = self.site(t.span());
                self.cluster_tls(name, decl.protocol, t)
            });
            out.push(ClusterConfig {
                name: name.as_str().into(),
                endpoints,
                balance: decl.balance,
                protocol: decl.protocol,
                connect_timeout: decl.connect_timeout.0,
                timeout: decl.timeout.map(|d| d.0),
                pool_idle_timeout: decl.pool_idle_timeout.0,
                pool_max_idle: decl.pool_max_idle,
                tls,
                settings,
                retry_budget: decl.retry_budget.clone(),
                sites,
            });
        }
        out
    }

    /// `[filters.NAME] limits` the engine cannot honour.
    fn filter_limits(&mut self, file: &schema::File) {
        let max = filter::HostLimits::MAX_HEADERS;
        for (name, decl) in &file.filters {
            if decl.limits.headers > max {
                self.at(
                    None,
                    format!(
                        "filter \"{name}\": limits.headers = {} is more than {max} (the most a header map can hold with room to spare)",
                        decl.limits.headers
                    ),
                );
            }
        }
    }

    fn listeners(
        &mut self,
        file: &schema::File,
        clusters: &HashMap<&str, usize>,
    ) -> Vec<ListenerConfig> {
        let mut out: Vec<ListenerConfig> = Vec::new();
        // Routes may name the built-in passthrough cluster.
        let mut with_builtin = clusters.clone();
        if file.clusters.contains_key(l4::PASSTHROUGH_NAME) {
            self.at_key(
                &format!("clusters.{}", l4::PASSTHROUGH_NAME),
                None,
                "cluster \"passthrough\" is built in (each connection's original destination); name yours differently",
            );
        }
        with_builtin.insert(l4::PASSTHROUGH_NAME, l4::PASSTHROUGH);
        let clusters = &with_builtin;
        for decl in &file.listeners {
            if out.iter().any(|l| *l.name == *decl.name) {
                self.at(
                    Some(decl.bind.span()),
                    format!("listener name \"{}\" is used twice", decl.name),
                );
            }
            let bind = match decl.bind.get_ref().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.at(
                        Some(decl.bind.span()),
                        format!(
                            "listener \"{}\": bind = \"{}\" is not an ip:port address",
                            decl.name,
                            decl.bind.get_ref()
                        ),
                    );
                    continue;
                }
            };
            // Sockets are bound with SO_REUSEPORT, so the kernel would let
            // two listeners share an address (or a wildcard and a specific
            // address on one port) and split its connections.
            if bind.port() != 0 {
                let overlaps = |other: SocketAddr| {
                    other.port() == bind.port()
                        && (other.ip() == bind.ip()
                            || other.ip().is_unspecified()
                            || bind.ip().is_unspecified())
                };
                if let Some(other) = out.iter().find(|l| overlaps(l.bind)) {
                    self.at(
                        Some(decl.bind.span()),
                        format!(
                            "listener \"{}\": bind = \"{bind}\" overlaps listener \"{}\"'s address {} (same port; SO_REUSEPORT would split connections between them)",
                            decl.name, other.name, other.bind
                        ),
                    );
                }
            }
            let mut pipeline = Vec::new();
            for f in &decl.pipeline {
                if !file.filters.contains_key(f.get_ref()) {
                    self.at(
                        Some(f.span()),
                        format!(
                            "listener \"{}\": pipeline names filter \"{}\", which no [filters.{}] section declares",
                            decl.name,
                            f.get_ref(),
                            f.get_ref()
                        ),
                    );
                }
                pipeline.push(Arc::from(f.get_ref().as_str()));
            }
            let (tls, allow) = match &decl.tls {
                Some(t) => self.listener_tls(&decl.name, t),
                None => (None, None),
            };
            let tls_site = decl
                .tls
                .as_ref()
                .map(|t| self.site(t.span()))
                .unwrap_or_default();
            let mutual = tls
                .as_ref()
                .is_some_and(ServerTlsSettings::requires_client_cert);
            let mut routes = Vec::new();
            let mut tcp_matches = Vec::new();
            let mut capture_routes = Vec::new();
            let mut capture_matches = Vec::new();
            self.l4_listener(decl);
            for (i, r) in decl.routes.iter().enumerate() {
                if let Some(a) = &r.allow {
                    if !mutual {
                        self.at(
                            Some(a.span()),
                            format!(
                                "listener \"{}\", route {}: `allow` needs the listener's tls.client_ca (without client certificates no peer has an identity)",
                                decl.name,
                                i + 1
                            ),
                        );
                    }
                }
                let site = self.route_site(decl.bind.span().start, i);
                let tcp_match = self.tcp_match(decl, i, r);
                // On a capture listener, a route matching by `sni`, `port`
                // or `cidr` is a TCP route (for what detection does not
                // take for HTTP); the others are HTTP routes.
                let captured_tcp = decl.capture.is_some() && l4::is_tcp_route(r);
                let tcp = captured_tcp || decl.protocol == ListenerProtocol::Tcp;
                let filters = self.route_filters(decl, i, r, &pipeline, &file.filters, tcp);
                match route::validate(i, r, clusters) {
                    Ok(route) if captured_tcp => {
                        capture_routes.push(RouteConfig { site, ..route });
                        capture_matches.push(tcp_match);
                    }
                    Ok(route) => {
                        routes.push(RouteConfig {
                            site,
                            filters,
                            ..route
                        });
                        tcp_matches.push(tcp_match);
                    }
                    Err(e) => {
                        let message =
                            format!("listener \"{}\", route {}: {}", decl.name, i + 1, e.message);
                        match e.span {
                            Some(span) => self.at(Some(span), message),
                            None => self.problems.push(site.problem(message)),
                        }
                    }
                }
            }
            let l = &decl.limits;
            if l.h2_keepalive_timeout.0.is_zero() && !l.h2_keepalive_interval.0.is_zero() {
                self.at(
                    Some(decl.bind.span()),
                    format!(
                        "listener \"{}\": limits.h2_keepalive_timeout must be more than 0s (turn pings off with h2_keepalive_interval = \"0s\")",
                        decl.name
                    ),
                );
            }
            if l.max_connections == 0 || l.max_connections > MAX_LISTENER_CONNECTIONS {
                self.at(
                    Some(decl.bind.span()),
                    format!(
                        "listener \"{}\": limits.max_connections = {} is not between 1 and {MAX_LISTENER_CONNECTIONS}",
                        decl.name, l.max_connections
                    ),
                );
            }
            out.push(ListenerConfig {
                name: decl.name.as_str().into(),
                bind,
                pipeline,
                limits: ListenerLimits {
                    max_connections: l.max_connections,
                    max_header_bytes: usize::try_from(l.max_header_bytes.0).unwrap_or(usize::MAX),
                    max_body_bytes: l.max_body_bytes.0,
                    header_timeout: l.header_timeout.0,
                    idle_timeout: l.idle_timeout.0,
                    stream_idle_timeout: nonzero(l.stream_idle_timeout.0),
                    request_timeout: nonzero(l.request_timeout.0),
                    h2_keepalive_interval: nonzero(l.h2_keepalive_interval.0),
                    h2_keepalive_timeout: l.h2_keepalive_timeout.0,
                },
                routes,
                tls,
                allow,
                trust_forwarded: self.trust_forwarded(decl),
                tls_site,
                l4: L4Config {
                    protocol: decl.protocol,
                    capture: decl.capture.as_ref().map(|c| *c.get_ref()),
                    detect_protocol: decl.detect_protocol,
                    opaque_ports: decl.opaque_ports.clone(),
                    idle_timeout: nonzero(l.tcp_idle_timeout.0),
                    detect_timeout: l.detect_timeout.0,
                    matches: if decl.capture.is_some() {
                        capture_matches
                    } else {
                        tcp_matches
                    },
                    tcp_routes: capture_routes,
                },
            });
        }
        out
    }
}

impl Validator<'_> {
    /// A route's own pipeline and filter configs (`route::route_filters`);
    /// problems are reported here, and the route then runs the listener's.
    fn route_filters(
        &mut self,
        decl: &schema::ListenerDecl,
        index: usize,
        r: &schema::RouteDecl,
        pipeline: &[Arc<str>],
        declared: &std::collections::BTreeMap<String, schema::FilterDecl>,
        tcp: bool,
    ) -> Option<route::RouteFilters> {
        let set = r.pipeline.is_some() || r.pipeline_append.is_some() || !r.filters.is_empty();
        if tcp && set {
            let message = format!(
                "listener \"{}\", route {}: `pipeline`, `pipeline_append` and `filters` are for HTTP routes (a TCP route's connections run the listener's network filters)",
                decl.name,
                index + 1
            );
            self.at_route(decl.bind.span().start, index, message);
            return None;
        }
        match route::route_filters(r, pipeline, declared) {
            Ok(f) => {
                for (name, value) in f.iter().flat_map(|f| f.configs.iter()) {
                    // The section's own config runs on the filter's own
                    // root context: no extra one to count.
                    let own = declared.get(&**name).map(|d| d.config.as_ref());
                    let empty = matches!(value, toml::Value::String(s) if s.is_empty());
                    if own == Some(Some(value)) || (own == Some(None) && empty) {
                        continue;
                    }
                    let seen = self.route_configs.entry(name.to_string()).or_default();
                    if seen.contains(value) {
                        continue;
                    }
                    if seen.len() >= route::MAX_ROUTE_CONFIGS {
                        let message = format!(
                            "listener \"{}\", route {}: filters.{name}.config: more than {} distinct per-route configs of filter \"{name}\" (each is one more root context in every instance of it)",
                            decl.name,
                            index + 1,
                            route::MAX_ROUTE_CONFIGS
                        );
                        let span = r.filters.get(&**name).map(|o| o.config.span());
                        self.at(span, message);
                    } else {
                        seen.push(value.clone());
                    }
                }
                f
            }
            Err(problems) => {
                for e in problems {
                    let message = format!(
                        "listener \"{}\", route {}: {}",
                        decl.name,
                        index + 1,
                        e.message
                    );
                    match e.span {
                        Some(span) => self.at(Some(span), message),
                        None => self.at_route(decl.bind.span().start, index, message),
                    }
                }
                None
            }
        }
    }

    /// The listener-wide L4 and capture keys that cannot go together.
    fn l4_listener(&mut self, decl: &schema::ListenerDecl) {
        let name = &decl.name;
        if let Some(c) = &decl.capture {
            if decl.protocol == ListenerProtocol::Tcp {
                self.at(Some(c.span()), format!("listener \"{name}\": `capture` is for HTTP listeners (they detect the protocol and proxy the rest as TCP); a protocol = \"tcp\" listener routes TCP only"));
            }
            if let Some(t) = &decl.tls {
                self.at(Some(t.span()), format!("listener \"{name}\": a capture listener does not terminate TLS (TLS the app sends passes through by SNI); remove `tls`"));
            }
        } else if !decl.opaque_ports.is_empty() {
            self.at(Some(decl.bind.span()), format!("listener \"{name}\": opaque_ports needs `capture` (only captured connections have an original destination port)"));
        }
        // A `tcp` listener with `tls` terminates it (mTLS between sidecars
        // for opaque TCP); without, TLS passes through, routed by `sni`.
    }

    /// A route's TCP match (`sni`, `port`, `cidr`); HTTP keys on a TCP
    /// listener and TCP keys on an HTTP one are errors.
    fn tcp_match(
        &mut self,
        decl: &schema::ListenerDecl,
        index: usize,
        r: &schema::RouteDecl,
    ) -> TcpMatch {
        let m = &r.matcher;
        let tcp_keys = m.sni.is_some() || m.port.is_some() || m.cidr.is_some();
        let http_keys = m.host.is_some()
            || m.prefix.is_some()
            || m.path.is_some()
            || m.regex.is_some()
            || m.method.is_some()
            || !m.headers.is_empty()
            || r.rewrite_prefix.is_some()
            || r.rewrite_host.is_some()
            || r.retry.is_some()
            || r.allow.is_some();
        let at = decl.bind.span().start;
        let name = &decl.name;
        if decl.protocol == ListenerProtocol::Tcp && http_keys {
            self.at_route(at, index, format!("listener \"{name}\", route {}: a protocol = \"tcp\" listener matches by `sni`, `port` or `cidr` only (host, path, method, headers, rewrites, retry and allow are HTTP)", index + 1));
        }
        if decl.protocol == ListenerProtocol::Http && tcp_keys {
            if decl.capture.is_none() {
                self.at_route(at, index, format!("listener \"{name}\", route {}: `sni`, `port` and `cidr` match TCP connections; set protocol = \"tcp\" on the listener (or `capture`, for its non-HTTP connections)", index + 1));
            } else if http_keys {
                self.at_route(at, index, format!("listener \"{name}\", route {}: a route matches HTTP requests (host, path, ...) or TCP connections (sni, port, cidr), not both", index + 1));
            }
        }
        match TcpMatch::compile(m) {
            Ok(t) => t,
            Err(e) => {
                let span = m.cidr.as_ref().map(toml::Spanned::span);
                let message = format!("listener \"{name}\", route {}: {e}", index + 1);
                match span {
                    Some(s) => self.at(Some(s), message),
                    None => self.at_route(at, index, message),
                }
                TcpMatch::default()
            }
        }
    }

    fn trust_forwarded(&mut self, decl: &schema::ListenerDecl) -> trust::TrustedPeers {
        let mut nets = Vec::with_capacity(decl.trust_forwarded.len());
        for entry in &decl.trust_forwarded {
            match trust::Net::parse(entry.get_ref()) {
                Ok(net) => nets.push(net),
                Err(e) => self.at(
                    Some(entry.span()),
                    format!(
                        "listener \"{}\": trust_forwarded entry \"{}\": {e}",
                        decl.name,
                        entry.get_ref()
                    ),
                ),
            }
        }
        trust::TrustedPeers::new(nets)
    }
}

/// `None` for a zero duration: the "0s turns it off" convention.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

// === TLS ===

impl Validator<'_> {
    /// A path from the config file, relative to the file's directory.
    fn file(&self, p: &str) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }

    fn listener_tls(
        &mut self,
        name: &str,
        decl: &toml::Spanned<schema::ListenerTlsDecl>,
    ) -> (Option<ServerTlsSettings>, Option<Allow>) {
        let span = Some(decl.span());
        let t = decl.get_ref();
        let before = self.problems.len();
        let default = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some(CertPaths {
                cert: self.file(c),
                key: self.file(k),
            }),
            (None, None) => None,
            _ => {
                self.at(
                    span.clone(),
                    format!("listener \"{name}\": tls needs both `cert` and `key`, or neither"),
                );
                None
            }
        };
        if default.is_none() && t.certs.is_empty() {
            self.at(
                span.clone(),
                format!(
                    "listener \"{name}\": tls needs `cert` and `key`, or `certs` chosen by SNI"
                ),
            );
        }
        let mut sni = Vec::new();
        for c in &t.certs {
            if c.sni.trim().is_empty() {
                self.at(
                    span.clone(),
                    format!("listener \"{name}\": a tls.certs entry has an empty `sni`"),
                );
            }
            sni.push(SniCert {
                sni: c.sni.clone(),
                paths: CertPaths {
                    cert: self.file(&c.cert),
                    key: self.file(&c.key),
                },
            });
        }
        if t.allow.is_some() && t.client_ca.is_none() {
            self.at(
                span.clone(),
                format!(
                    "listener \"{name}\": tls.allow needs tls.client_ca (without client certificates no peer has an identity)"
                ),
            );
        }
        if self.problems.len() > before {
            return (None, None);
        }
        let settings = ServerTlsSettings {
            listener: name.into(),
            default,
            sni,
            client_ca: t.client_ca.as_deref().map(|p| self.file(p)),
            min_version: match t.min_version {
                schema::TlsVersion::Tls12 => MinVersion::Tls12,
                schema::TlsVersion::Tls13 => MinVersion::Tls13,
            },
        };
        (Some(settings), t.allow.clone().map(Allow::new))
    }

    fn cluster_tls(
        &mut self,
        name: &str,
        protocol: UpstreamProtocol,
        decl: &toml::Spanned<schema::ClusterTlsDecl>,
    ) -> Option<ClientTlsSettings> {
        let span = Some(decl.span());
        let t = decl.get_ref();
        let client = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some(CertPaths {
                cert: self.file(c),
                key: self.file(k),
            }),
            (None, None) => None,
            _ => {
                self.at(
                    span,
                    format!("cluster \"{name}\": tls needs both `cert` and `key` for a client certificate, or neither"),
                );
                return None;
            }
        };
        if t.insecure_skip_verify && (t.ca.is_some() || t.expect_identity.is_some()) {
            self.at(
                span,
                format!("cluster \"{name}\": tls.insecure_skip_verify = true turns off the checks that `ca` and `expect_identity` ask for; remove one or the other"),
            );
            return None;
        }
        let settings = ClientTlsSettings {
            cluster: name.into(),
            ca: t.ca.as_deref().map(|p| self.file(p)),
            client,
            sni: t.sni.clone(),
            expect_identity: t.expect_identity.clone(),
            insecure_skip_verify: t.insecure_skip_verify,
            h2: protocol == UpstreamProtocol::Http2,
        };
        Some(settings)
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
