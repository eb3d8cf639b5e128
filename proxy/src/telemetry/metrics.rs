//! The proxy's own Prometheus metrics and the `/metrics` exposition.
//!
//! Series are created when a config snapshot is built (off the request path)
//! and handed to workers as `Arc`s, so recording a request is a few relaxed
//! atomic adds: no label formatting, no map lookup, no lock. Paths never
//! become labels; the label sets are bounded by the config (listeners,
//! routes, clusters) and by the fixed list of error codes.

// Every `x-wasp-error` code, resolved per listener when its stats are
// built so counting an error takes no lock.
use crate::errors::ErrorCode;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    cluster: String,
    code_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: String,
    route: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpBytesLabels {
    listener: String,
    route: String,
    cluster: String,
    /// `upstream` (client to upstream) or `downstream` (back).
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    listener: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsErrorLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsUpstreamErrorLabels {
    cluster: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    /// `listener` or `cluster`.
    scope: &'static str,
    /// The listener's or cluster's name.
    name: String,
    /// `default`, the SNI name it is served for, or `client`.
    cert: String,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric the core proxy exports. One per process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    conns_open: Family<ListenerLabels, Gauge>,
    conns_total: Family<ListenerLabels, Counter>,
    upstream_open: Family<ClusterLabels, Gauge>,
    upstream_total: Family<ClusterLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    tls_handshake_errors: Family<TlsErrorLabels, Counter>,
    tls_upstream_handshake_errors: Family<TlsUpstreamErrorLabels, Counter>,
    tls_handshakes: Family<ListenerLabels, Counter>,
    tls_resumed: Family<ListenerLabels, Counter>,
    tls_cert_expiry: Family<CertLabels, Gauge>,
    tcp_connections: Family<RouteLabels, Counter>,
    tcp_open: Family<RouteLabels, Gauge>,
    tcp_bytes: Family<TcpBytesLabels, Counter>,
    tcp_duration: Family<RouteLabels, Histogram>,
}

/// Pre-resolved series for one (listener, route, cluster) of proxied TCP.
#[derive(Clone, Debug)]
pub struct TcpStats {
    pub connections: Counter,
    pub open: Gauge,
    pub to_upstream: Counter,
    pub to_downstream: Counter,
    pub duration: Histogram,
}

/// Pre-resolved series for one (listener, route, cluster).
#[derive(Clone, Debug)]
pub struct RequestStats {
    by_class: [Counter; 5],
    pub duration: Histogram,
}

/// Pre-resolved series for one listener.
#[derive(Clone, Debug)]
pub struct ListenerStats {
    pub open: Gauge,
    pub accepted: Counter,
    /// TLS handshakes completed (TLS listeners only).
    pub tls_handshakes: Counter,
    /// Of those, resumed ones (a session ticket, no certificate exchange).
    pub tls_resumed: Counter,
    /// The error counter of each code, indexed by `ErrorCode as usize`.
    errors: Arc<[Counter]>,
    metrics: Arc<Metrics>,
    listener: Arc<str>,
}

/// Pre-resolved series for one cluster's upstream connections.
#[derive(Clone, Debug)]
pub struct UpstreamStats {
    pub open: Gauge,
    pub opened: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("wasp");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by listener, route, cluster and status class",
            requests.clone(),
        );
        let durations = Family::<RouteLabels, Histogram>::default();
        registry.register(
            "request_duration_seconds",
            "Time from the request's arrival to the response headers being sent",
            durations.clone(),
        );
        let conns_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "downstream_connections_open",
            "Client connections currently open",
            conns_open.clone(),
        );
        let conns_total = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "downstream_connections",
            "Client connections accepted",
            conns_total.clone(),
        );
        let upstream_open = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "upstream_connections_open",
            "Connections to upstream endpoints currently open",
            upstream_open.clone(),
        );
        let upstream_total = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "upstream_connections",
            "Connections opened to upstream endpoints",
            upstream_total.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "proxy_errors",
            "Responses the proxy made itself, by x-wasp-error code",
            errors.clone(),
        );
        let tls_handshake_errors = Family::<TlsErrorLabels, Counter>::default();
        registry.register(
            "tls_handshake_errors",
            "TLS handshakes with clients that failed, by listener and reason",
            tls_handshake_errors.clone(),
        );
        let tls_upstream_handshake_errors = Family::<TlsUpstreamErrorLabels, Counter>::default();
        registry.register(
            "tls_upstream_handshake_errors",
            "TLS handshakes with upstream endpoints that failed, by cluster and reason",
            tls_upstream_handshake_errors.clone(),
        );
        let tls_handshakes = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes with clients completed",
            tls_handshakes.clone(),
        );
        let tls_resumed = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tls_resumed_handshakes",
            "TLS handshakes with clients that resumed a session",
            tls_resumed.clone(),
        );
        let tls_cert_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When each certificate the proxy presents expires (notAfter, Unix seconds)",
            tls_cert_expiry.clone(),
        );
        let tcp_connections = Family::<RouteLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "TCP connections proxied at L4 (tcp listeners; opaque and TLS passthrough on capture listeners), by listener, route and cluster",
            tcp_connections.clone(),
        );
        let tcp_open = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "TCP connections proxied at L4 currently open",
            tcp_open.clone(),
        );
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        registry.register(
            "tcp_bytes",
            "Bytes relayed at L4, by direction (upstream: from the client; downstream: back to it), counted as they move",
            tcp_bytes.clone(),
        );
        let tcp_duration = Family::<RouteLabels, Histogram>::default();
        registry.register(
            "tcp_connection_duration_seconds",
            "How long proxied TCP connections lasted",
            tcp_duration.clone(),
        );
        super::trace::register_metrics(&mut registry);
        Arc::new(Self {
            registry,
            tls_handshake_errors,
            tls_upstream_handshake_errors,
            tls_handshakes,
            tls_resumed,
            tls_cert_expiry,
            requests,
            durations,
            conns_open,
            conns_total,
            upstream_open,
            upstream_total,
            errors,
            tcp_connections,
            tcp_open,
            tcp_bytes,
            tcp_duration,
        })
    }

    /// The L4 series of one (listener, route, cluster); resolved when a
    /// snapshot is built.
    pub fn tcp_stats(&self, listener: &str, route: &str, cluster: &str) -> TcpStats {
        let labels = RouteLabels {
            listener: listener.into(),
            route: route.into(),
            cluster: cluster.into(),
        };
        let bytes = |direction| {
            self.tcp_bytes
                .get_or_create(&TcpBytesLabels {
                    listener: listener.into(),
                    route: route.into(),
                    cluster: cluster.into(),
                    direction,
                })
                .clone()
        };
        TcpStats {
            connections: self.tcp_connections.get_or_create(&labels).clone(),
            open: self.tcp_open.get_or_create(&labels).clone(),
            to_upstream: bytes("upstream"),
            to_downstream: bytes("downstream"),
            duration: self.tcp_duration.get_or_create(&labels).clone(),
        }
    }

    pub fn request_stats(&self, listener: &str, route: &str, cluster: &str) -> RequestStats {
        let class = |c: &'static str| {
            self.requests
                .get_or_create(&RequestLabels {
                    listener: listener.into(),
                    route: route.into(),
                    cluster: cluster.into(),
                    code_class: c,
                })
                .clone()
        };
        RequestStats {
            by_class: CLASSES.map(class),
            duration: self
                .durations
                .get_or_create(&RouteLabels {
                    listener: listener.into(),
                    route: route.into(),
                    cluster: cluster.into(),
                })
                .clone(),
        }
    }

    pub fn listener_stats(self: &Arc<Self>, listener: &Arc<str>) -> ListenerStats {
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        ListenerStats {
            open: self.conns_open.get_or_create(&labels).clone(),
            accepted: self.conns_total.get_or_create(&labels).clone(),
            tls_handshakes: self.tls_handshakes.get_or_create(&labels).clone(),
            tls_resumed: self.tls_resumed.get_or_create(&labels).clone(),
            errors: ErrorCode::ALL
                .iter()
                .take_while(|code| code.on_listener())
                .map(|code| {
                    self.errors
                        .get_or_create(&ErrorLabels {
                            listener: listener.to_string(),
                            code: code.as_str(),
                        })
                        .clone()
                })
                .collect(),
            metrics: self.clone(),
            listener: listener.clone(),
        }
    }

    pub fn upstream_stats(&self, cluster: &str) -> UpstreamStats {
        let labels = ClusterLabels {
            cluster: cluster.into(),
        };
        UpstreamStats {
            open: self.upstream_open.get_or_create(&labels).clone(),
            opened: self.upstream_total.get_or_create(&labels).clone(),
        }
    }

    /// The expiry gauge of one certificate; resolved when TLS starts, set
    /// again on every reload.
    pub fn tls_cert_expiry(&self, scope: &'static str, name: &str, cert: &str) -> Gauge {
        self.tls_cert_expiry
            .get_or_create(&CertLabels {
                scope,
                name: name.into(),
                cert: cert.into(),
            })
            .clone()
    }

    /// The handshake failure counter of a TLS listener.
    pub fn tls_listener_errors(&self, listener: &str) -> TlsErrors {
        TlsErrors::Listener(self.tls_handshake_errors.clone(), listener.into())
    }

    /// The handshake failure counter of a TLS cluster.
    pub fn tls_cluster_errors(&self, cluster: &str) -> TlsErrors {
        TlsErrors::Cluster(self.tls_upstream_handshake_errors.clone(), cluster.into())
    }

    /// The text exposition of every registered metric (no trailing `# EOF`,
    /// so other sections can be appended).
    pub fn render(&self, out: &mut String) {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_ok() {
            out.push_str(&prometheus_text(
                text.trim_end().trim_end_matches("# EOF").trim_end(),
            ));
            out.push('\n');
        }
    }
}

/// Counts failed TLS handshakes of one listener or cluster by reason.
#[derive(Clone)]
pub enum TlsErrors {
    Listener(Family<TlsErrorLabels, Counter>, Arc<str>),
    Cluster(Family<TlsUpstreamErrorLabels, Counter>, Arc<str>),
}

impl std::fmt::Debug for TlsErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsErrors")
    }
}

impl TlsErrors {
    /// Failures are rare and already cost a handshake, so the label lookup
    /// here is fine.
    pub fn inc(&self, reason: &'static str) {
        match self {
            Self::Listener(family, name) => family
                .get_or_create(&TlsErrorLabels {
                    listener: name.to_string(),
                    reason,
                })
                .inc(),
            Self::Cluster(family, name) => family
                .get_or_create(&TlsUpstreamErrorLabels {
                    cluster: name.to_string(),
                    reason,
                })
                .inc(),
        };
    }
}

// === impl RequestStats ===

impl RequestStats {
    pub fn record(&self, status: u16, secs: f64) {
        let i = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[i].inc();
        self.duration.observe_secs(secs);
    }
}

// === impl ListenerStats ===

impl ListenerStats {
    /// Counts a proxy-made error. Errors come in storms (an upstream down,
    /// a flood of bad requests), and the family's lock is shared by every
    /// worker, so the known codes go straight to their pre-resolved counter.
    pub fn error(&self, code: ErrorCode) {
        match self.errors.get(code as usize) {
            Some(counter) => {
                counter.inc();
            }
            // Unreachable while `errors` is built from `ErrorCode::ALL`;
            // counting through the family keeps it correct regardless.
            None => {
                self.metrics
                    .errors
                    .get_or_create(&ErrorLabels {
                        listener: self.listener.to_string(),
                        code: code.as_str(),
                    })
                    .inc();
            }
        }
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has
/// samples `x_total`. The Prometheus text format (what `/metrics` serves
/// and `promtool` checks) names the family `x_total` too.
fn prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{ErrorLabels, Metrics};
    use crate::errors::ErrorCode;

    fn labels(code: &'static str) -> ErrorLabels {
        ErrorLabels {
            listener: "inbound".into(),
            code,
        }
    }

    #[test]
    fn errors_are_counted_without_the_family_lock() {
        let metrics = Metrics::new();
        let stats = metrics.listener_stats(&Arc::from("inbound"));
        // Dropped from the family, the series can only come back through a
        // lookup, which the hot path must not do.
        metrics.errors.remove(&labels("upstream_connect"));
        stats.error(ErrorCode::UpstreamConnect);
        assert!(metrics.errors.get(&labels("upstream_connect")).is_none());
        let i = ErrorCode::UpstreamConnect as usize;
        assert_eq!(stats.errors.get(i).map(|c| c.get()), Some(1));
    }

    #[test]
    fn error_series_keep_their_names_and_labels() {
        let metrics = Metrics::new();
        let stats = metrics.listener_stats(&Arc::from("inbound"));
        stats.error(ErrorCode::NoRoute);
        stats.error(ErrorCode::NoRoute);
        let mut text = String::new();
        metrics.render(&mut text);
        for line in [
            "# TYPE wasp_proxy_errors_total counter",
            "wasp_proxy_errors_total{listener=\"inbound\",code=\"no_route\"} 2",
            "wasp_proxy_errors_total{listener=\"inbound\",code=\"filter_failed\"} 0",
            "wasp_proxy_errors_total{listener=\"inbound\",code=\"overflow\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn counter_families_get_their_total_suffix() {
        let text = "# HELP wasp_requests Requests.\n# TYPE wasp_requests counter\nwasp_requests_total{a=\"b\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2";
        assert_eq!(
            super::prometheus_text(text),
            "# HELP wasp_requests_total Requests.\n# TYPE wasp_requests_total counter\nwasp_requests_total{a=\"b\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2"
        );
    }
}
