//! The TOML of a test's `wasp.toml`, built from the pieces a reader of the
//! test looks for: listeners (HTTP or `tcp`) and their routes, filters and
//! clusters. What a test sets stays in its body; what every config repeats
//! (`[proxy] workers = 1`, the table headers, quoting) is written here once.
//!
//! Anything without a method of its own is a raw TOML line (`with`), so a
//! test can say every setting as configuration.md names it.

use std::fmt::{self, Display, Write as _};
use std::net::SocketAddr;

use super::{free_port, loopback, TempDir, Wasp};

/// A whole config: `[proxy]` with one worker, then filters, listeners and
/// clusters in the order each kind was added. `[admin]` is left to
/// [`Wasp::start`] (it picks a free address).
#[derive(Clone, Debug)]
pub struct Config {
    proxy: Vec<String>,
    filters: Vec<Filter>,
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// `[proxy] workers = 1` and nothing else.
    pub fn new() -> Self {
        Self {
            proxy: vec!["workers = 1".into()],
            filters: Vec::new(),
            listeners: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// Another `[proxy]` line, e.g. `drain_timeout = "2s"`.
    pub fn proxy(mut self, line: &str) -> Self {
        self.proxy.push(line.into());
        self
    }

    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    pub fn listener(mut self, listener: Listener) -> Self {
        self.listeners.push(listener);
        self
    }

    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// Changes the filter `name` added before (a test's variation of a
    /// shared config).
    pub fn edit_filter(mut self, name: &str, edit: impl FnOnce(Filter) -> Filter) -> Self {
        edit_named(&mut self.filters, |f| f.name == name, edit, "filter", name);
        self
    }

    /// Changes the listener `name` added before.
    pub fn edit_listener(mut self, name: &str, edit: impl FnOnce(Listener) -> Listener) -> Self {
        edit_named(
            &mut self.listeners,
            |l| l.name == name,
            edit,
            "listener",
            name,
        );
        self
    }

    /// Changes the cluster `name` added before.
    pub fn edit_cluster(mut self, name: &str, edit: impl FnOnce(Cluster) -> Cluster) -> Self {
        edit_named(
            &mut self.clusters,
            |c| c.name == name,
            edit,
            "cluster",
            name,
        );
        self
    }

    /// The config as `wasp.toml` text (without `[admin]`).
    pub fn toml(&self) -> String {
        self.to_string()
    }
}

impl Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[proxy]")?;
        for line in &self.proxy {
            writeln!(f, "{line}")?;
        }
        for x in &self.filters {
            write!(f, "\n{x}")?;
        }
        for x in &self.listeners {
            write!(f, "\n{x}")?;
        }
        for x in &self.clusters {
            write!(f, "\n{x}")?;
        }
        Ok(())
    }
}

/// Replaces the item `is_it` picks with what `edit` makes of it.
fn edit_named<T: Clone>(
    items: &mut [T],
    is_it: impl Fn(&T) -> bool,
    edit: impl FnOnce(T) -> T,
    kind: &str,
    name: &str,
) {
    let Some(item) = items.iter_mut().find(|i| is_it(i)) else {
        panic!("no {kind} {name:?} in the config");
    };
    *item = edit(item.clone());
}

/// `["a", "b"]`.
fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn names(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `[filters.NAME]` with its `module` (a file in `filters.d`).
#[derive(Clone, Debug)]
pub struct Filter {
    name: String,
    module: String,
    lines: Vec<String>,
}

impl Filter {
    pub fn new(name: &str, module: &str) -> Self {
        Self {
            name: name.into(),
            module: module.into(),
            lines: Vec::new(),
        }
    }

    /// `config = <value>`: the value as TOML (`"deny"`, `{ a = 1 }`).
    pub fn config(self, value: &str) -> Self {
        self.with(&format!("config = {value}"))
    }

    /// Any other line of the table, e.g. `fail = "closed"`.
    pub fn with(mut self, line: &str) -> Self {
        self.lines.push(line.into());
        self
    }
}

impl Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[filters.{}]", self.name)?;
        writeln!(f, "module = {:?}", self.module)?;
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// One `[[listeners]]` table with its routes.
#[derive(Clone, Debug)]
pub struct Listener {
    name: String,
    tcp: bool,
    bind: String,
    pipeline: Option<Vec<String>>,
    lines: Vec<String>,
    routes: Vec<Route>,
}

impl Listener {
    /// An HTTP listener on `127.0.0.1:port`.
    pub fn http(name: &str, port: u16) -> Self {
        Self::http_on(name, &loopback(port).to_string())
    }

    /// An HTTP listener on any `bind` address (`0.0.0.0:15001`).
    pub fn http_on(name: &str, bind: &str) -> Self {
        Self {
            name: name.into(),
            tcp: false,
            bind: bind.into(),
            pipeline: None,
            lines: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// A `protocol = "tcp"` (L4) listener on `127.0.0.1:port`.
    pub fn tcp(name: &str, port: u16) -> Self {
        Self::tcp_on(name, &loopback(port).to_string())
    }

    /// A `protocol = "tcp"` listener on any `bind` address.
    pub fn tcp_on(name: &str, bind: &str) -> Self {
        Self {
            tcp: true,
            ..Self::http_on(name, bind)
        }
    }

    /// The listener's `pipeline` (set again, it replaces the first).
    pub fn pipeline(mut self, filters: &[&str]) -> Self {
        self.pipeline = Some(names(filters));
        self
    }

    /// `limits = { <inner> }`, e.g. `limits(r#"tcp_idle_timeout = "300ms""#)`.
    pub fn limits(self, inner: &str) -> Self {
        self.with(&format!("limits = {{ {inner} }}"))
    }

    /// `tls = { <inner> }`.
    pub fn tls(self, inner: &str) -> Self {
        self.with(&format!("tls = {{ {inner} }}"))
    }

    /// Any other line of the listener's table (`capture = "outbound"`).
    pub fn with(mut self, line: &str) -> Self {
        self.lines.push(line.into());
        self
    }

    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// One route, matching everything, to `cluster`.
    pub fn to(self, cluster: &str) -> Self {
        self.route(Route::to(cluster))
    }
}

impl Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[[listeners]]")?;
        writeln!(f, "name = {:?}", self.name)?;
        if self.tcp {
            writeln!(f, "protocol = \"tcp\"")?;
        }
        writeln!(f, "bind = {:?}", self.bind)?;
        if let Some(p) = &self.pipeline {
            writeln!(f, "pipeline = {}", list(p))?;
        }
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        for r in &self.routes {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One `[[listeners.routes]]` entry.
#[derive(Clone, Debug)]
pub struct Route {
    name: Option<String>,
    matches: Option<String>,
    cluster: String,
    lines: Vec<String>,
}

impl Route {
    /// A route to `cluster`, matching everything until `matching` says
    /// otherwise.
    pub fn to(cluster: &str) -> Self {
        Self {
            name: None,
            matches: None,
            cluster: cluster.into(),
            lines: Vec::new(),
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// `match = { <inner> }`, e.g. `matching(r#"sni = "a.example""#)`.
    pub fn matching(mut self, inner: &str) -> Self {
        self.matches = Some(inner.into());
        self
    }

    /// The route's own `pipeline` (replaces the listener's).
    pub fn pipeline(self, filters: &[&str]) -> Self {
        self.with(&format!("pipeline = {}", list(&names(filters))))
    }

    /// `pipeline_append` (runs after the listener's).
    pub fn pipeline_append(self, filters: &[&str]) -> Self {
        self.with(&format!("pipeline_append = {}", list(&names(filters))))
    }

    /// `filters.NAME.config = <value>`: the filter's per-route config.
    pub fn filter_config(self, filter: &str, value: &str) -> Self {
        self.with(&format!("filters.{filter}.config = {value}"))
    }

    /// Any other line of the route.
    pub fn with(mut self, line: &str) -> Self {
        self.lines.push(line.into());
        self
    }
}

impl Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  [[listeners.routes]]")?;
        if let Some(n) = &self.name {
            writeln!(f, "  name = {n:?}")?;
        }
        if let Some(m) = &self.matches {
            writeln!(f, "  match = {{ {m} }}")?;
        }
        writeln!(f, "  cluster = {:?}", self.cluster)?;
        for line in &self.lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// `[clusters.NAME]` with its endpoints.
#[derive(Clone, Debug)]
pub struct Cluster {
    name: String,
    endpoints: Vec<String>,
    lines: Vec<String>,
}

impl Cluster {
    pub fn new(name: &str, endpoints: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            name: name.into(),
            endpoints: endpoints.into_iter().map(|a| a.to_string()).collect(),
            lines: Vec::new(),
        }
    }

    /// `tls = { <inner> }`.
    pub fn tls(self, inner: &str) -> Self {
        self.with(&format!("tls = {{ {inner} }}"))
    }

    /// Any other line of the table (`protocol = "http2"`).
    pub fn with(mut self, line: &str) -> Self {
        self.lines.push(line.into());
        self
    }
}

impl Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[clusters.{}]", self.name)?;
        let mut eps = String::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(eps, "{sep}{e:?}");
        }
        writeln!(f, "endpoints = [{eps}]")?;
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// One worker, one `tcp` listener `name` on `port` whose only route goes to
/// the cluster `cluster` at `endpoint`: the L4 tests' plainest proxy.
pub fn tcp_proxy(name: &str, port: u16, cluster: &str, endpoint: SocketAddr) -> Config {
    Config::new()
        .listener(Listener::tcp(name, port).to(cluster))
        .cluster(Cluster::new(cluster, [endpoint]))
}

impl Wasp {
    /// Starts wasp in `dir` (a `filters.d` filled by `with_fixtures`, say)
    /// on the config `config` makes for a free listener port; returns it
    /// with that listener's address.
    pub fn start_on_free_port(
        dir: TempDir,
        config: impl FnOnce(u16) -> String,
    ) -> (Wasp, SocketAddr) {
        let port = free_port();
        let wasp = Wasp::start_in(dir, &config(port), &[]);
        (wasp, loopback(port))
    }

    /// Writes `config` (with this process's `[admin]`) over the running
    /// proxy's `wasp.toml`, for a reload to read.
    pub fn rewrite_config(&self, config: &str) {
        let text = format!("[admin]\nbind = \"{}\"\n\n{config}", self.admin);
        std::fs::write(self.config_path(), text).expect("rewrite config");
    }

    /// The proxy's `wasp.toml`.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("wasp.toml")
    }
}
