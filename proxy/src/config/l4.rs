//! A listener's settings below HTTP as plain data: `protocol = "tcp"`
//! (L4 listeners), `capture` (transparent listeners: detection, opaque
//! ports) and the TCP routes' matches (destination port, network, TLS
//! server name). `l4` and `capture` act on them; `snapshot` compiles the
//! TCP routes with their series.

use std::net::SocketAddr;
use std::time::Duration;

use super::route::{PathMatch, RouteConfig, Target};
use super::schema::{self, CaptureMode, ListenerProtocol, MatchDecl};
use super::trust::Net;

/// The cluster id of the built-in `passthrough` cluster: a connection's
/// original destination (capture listeners). Never an index into the
/// config's clusters; `upstream::Upstreams::get` knows it.
pub const PASSTHROUGH: usize = usize::MAX;

/// The name routes use for [`PASSTHROUGH`].
pub const PASSTHROUGH_NAME: &str = "passthrough";

/// How a listener treats connections below HTTP.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct L4Config {
    pub protocol: ListenerProtocol,
    pub capture: Option<CaptureMode>,
    pub detect_protocol: bool,
    pub opaque_ports: Vec<u16>,
    /// `None`: off ("0s").
    pub idle_timeout: Option<Duration>,
    pub detect_timeout: Duration,
    /// The TCP routes' matches: per route of the listener's `routes` on a
    /// `tcp` listener; per route of `tcp_routes` on a capture listener.
    pub matches: Vec<TcpMatch>,
    /// A capture listener's TCP routes (matching by `sni`, `port`, `cidr`),
    /// for the connections detection does not take for HTTP; its other
    /// routes are the listener's `routes`. Empty on other listeners.
    pub tcp_routes: Vec<RouteConfig>,
}

impl L4Config {
    pub fn is_tcp(&self) -> bool {
        self.protocol == ListenerProtocol::Tcp
    }

    /// Whether connections are proxied below HTTP here (a `tcp` or a
    /// capture listener).
    pub fn below_http(&self) -> bool {
        self.is_tcp() || self.capture.is_some()
    }

    /// The TCP routes, in the order of [`L4Config::matches`]: the
    /// listener's routes on a `tcp` listener, `tcp_routes` on a capture one.
    pub fn routes<'a>(&'a self, listener_routes: &'a [RouteConfig]) -> &'a [RouteConfig] {
        if self.is_tcp() {
            listener_routes
        } else {
            &self.tcp_routes
        }
    }
}

/// Whether a route matches TCP connections (`sni`, `port`, `cidr`).
pub fn is_tcp_route(r: &schema::RouteDecl) -> bool {
    let m = &r.matcher;
    m.sni.is_some() || m.port.is_some() || m.cidr.is_some()
}

/// What a capture listener does with a request no route claims: send it
/// where the app meant it to go, untouched.
pub fn passthrough_route() -> RouteConfig {
    RouteConfig {
        name: PASSTHROUGH_NAME.into(),
        host: None,
        path: PathMatch::Any,
        method: None,
        headers: Vec::new(),
        target: Target::One(PASSTHROUGH),
        timeout: None,
        rewrite_prefix: None,
        rewrite_host: None,
        retry: None,
        allow: None,
        filters: None,
        site: Default::default(),
    }
}

/// A TCP route's match; every key set must hold, none set matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpMatch {
    sni: Option<SniMatch>,
    pub port: Option<u16>,
    cidr: Option<Net>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SniMatch {
    Exact(String),
    /// `*.example.com` kept as `.example.com`.
    Suffix(String),
}

impl TcpMatch {
    pub fn compile(m: &MatchDecl) -> Result<Self, String> {
        let sni = match m.sni.as_deref().map(str::trim) {
            Some("") => return Err("`sni` is empty".into()),
            Some(s) => {
                let s = s.to_ascii_lowercase();
                Some(match s.strip_prefix('*') {
                    Some(rest) if rest.starts_with('.') && rest.len() > 1 => {
                        SniMatch::Suffix(rest.to_string())
                    }
                    Some(_) => return Err(format!("sni \"{s}\": a wildcard is `*.domain`")),
                    None => SniMatch::Exact(s),
                })
            }
            None => None,
        };
        if m.port == Some(0) {
            return Err("port = 0 matches nothing; use 1..=65535".into());
        }
        let cidr = match &m.cidr {
            Some(c) => Some(
                Net::parse(c.get_ref()).map_err(|e| format!("cidr \"{}\": {e}", c.get_ref()))?,
            ),
            None => None,
        };
        Ok(Self {
            sni,
            port: m.port,
            cidr,
        })
    }

    /// Whether this route needs the ClientHello's server name to decide.
    pub fn wants_sni(&self) -> bool {
        self.sni.is_some()
    }

    /// `dst` is where the client meant to connect (the original
    /// destination when captured); `sni` the ClientHello's name, if any.
    pub fn matches(&self, dst: SocketAddr, sni: Option<&str>) -> bool {
        if self.port.is_some_and(|p| p != dst.port()) {
            return false;
        }
        if self.cidr.as_ref().is_some_and(|n| !n.contains(dst.ip())) {
            return false;
        }
        match (&self.sni, sni) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(SniMatch::Exact(e)), Some(name)) => name.eq_ignore_ascii_case(e),
            (Some(SniMatch::Suffix(s)), Some(name)) => {
                name.len() > s.len()
                    && name
                        .get(name.len() - s.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(
        sni: Option<&str>,
        port: Option<u16>,
        cidr: Option<&str>,
    ) -> Result<TcpMatch, String> {
        let m = MatchDecl {
            sni: sni.map(str::to_string),
            port,
            cidr: cidr.map(|c| toml::Spanned::new(0..0, c.to_string())),
            ..MatchDecl::default()
        };
        TcpMatch::compile(&m)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn port_cidr_and_sni_all_have_to_hold() {
        let m = compile(Some("*.example.com"), Some(443), Some("10.0.0.0/8"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches(addr("10.1.2.3:443"), Some("DB.example.com")));
        assert!(!m.matches(addr("10.1.2.3:443"), Some("example.com")));
        assert!(!m.matches(addr("10.1.2.3:443"), None));
        assert!(!m.matches(addr("10.1.2.3:444"), Some("db.example.com")));
        assert!(!m.matches(addr("11.1.2.3:443"), Some("db.example.com")));
        let any = compile(None, None, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(any.matches(addr("[::1]:1"), None));
        let exact = compile(Some("db"), None, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(exact.matches(addr("1.2.3.4:5"), Some("DB")));
        assert!(!exact.matches(addr("1.2.3.4:5"), Some("db2")));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(compile(Some(""), None, None).is_err());
        assert!(compile(Some("*example.com"), None, None).is_err());
        assert!(compile(None, Some(0), None).is_err());
        assert!(compile(None, None, Some("10.0.0.0/33")).is_err());
    }
}
