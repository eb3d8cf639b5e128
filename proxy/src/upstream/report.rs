//! What the admin API shows about upstreams: the `/clusters` JSON and the
//! per-cluster and per-endpoint series appended to `/metrics`.
//!
//! Runs on the control thread (admin handlers); reads atomics only.
//! Endpoint labels are bounded by the config and discovery.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use super::balance::now_nanos;
use super::cluster::ClusterState;
use super::Cluster;

fn state_of(ep: &super::EndpointState, now: u64) -> &'static str {
    if !ep.healthy() {
        "unhealthy"
    } else if ep.ejected(now) {
        "ejected"
    } else {
        "healthy"
    }
}

/// `GET /clusters`.
pub fn clusters_json(clusters: &[Cluster]) -> Value {
    let now = now_nanos();
    let clusters: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let s: &ClusterState = &c.state;
            let (_, panic) = s.pickable(now);
            let endpoints: Vec<Value> = s
                .endpoints()
                .endpoints
                .iter()
                .map(|ep| {
                    let requests = ep.requests.load(Relaxed);
                    let latency_total = ep.latency_ns_total.load(Relaxed);
                    json!({
                        "address": ep.addr.to_string(),
                        "weight": ep.weight(),
                        "health": state_of(ep, now),
                        "healthy": ep.healthy(),
                        "ejected": ep.ejected(now),
                        "ejections": ep.ejections(),
                        "in_flight": ep.in_flight.load(Relaxed).max(0),
                        "latency_estimate_ms": ep.estimate_ns.load(Relaxed) as f64 / 1e6,
                        "latency_mean_ms": if requests > 0 { latency_total as f64 / requests as f64 / 1e6 } else { 0.0 },
                        "requests": requests,
                        "failures": ep.failures.load(Relaxed),
                    })
                })
                .collect();
            json!({
                "name": &*c.name,
                "balance": c.balance,
                "discovery": discovery_name(s),
                "discovery_error": s.discovery_error.load().as_deref(),
                "version": s.version(),
                "panic": panic,
                "in_flight": s.in_flight.load(Relaxed),
                "retries": s.counters.retries.load(Relaxed),
                "retry_budget_exhausted": s.counters.budget_exhausted.load(Relaxed),
                "overflows": s.counters.overflows.load(Relaxed),
                "ejections": s.counters.ejections.load(Relaxed),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "clusters": clusters })
}

/// Where a cluster's endpoints come from, in one line (`static`,
/// `dns:name:port`, `srv:name`, `file:path`).
pub fn discovery_name(s: &ClusterState) -> String {
    match &s.settings.discovery {
        super::discovery::Discovery::Static => "static".into(),
        super::discovery::Discovery::Dns(d) if d.srv => format!("srv:{}", d.name),
        super::discovery::Discovery::Dns(d) => format!("dns:{}:{}", d.name, d.port),
        super::discovery::Discovery::File(p) => format!("file:{}", p.display()),
    }
}

/// Appends the upstream series to a Prometheus text exposition.
pub fn render_metrics(clusters: &[Cluster], out: &mut String) {
    let now = now_nanos();
    type ClusterGet = fn(&ClusterState) -> u64;
    let cluster_counters: [(&str, &str, ClusterGet); 6] = [
        ("wasp_cluster_retries_total", "Retries sent", |s| {
            s.counters.retries.load(Relaxed)
        }),
        (
            "wasp_cluster_retry_budget_exhausted_total",
            "Retries not sent because the retry budget was spent",
            |s| s.counters.budget_exhausted.load(Relaxed),
        ),
        (
            "wasp_cluster_overflows_total",
            "Requests refused by the circuit breakers (503 overflow)",
            |s| s.counters.overflows.load(Relaxed),
        ),
        (
            "wasp_cluster_ejections_total",
            "Endpoints ejected by outlier detection",
            |s| s.counters.ejections.load(Relaxed),
        ),
        (
            "wasp_cluster_discovery_updates_total",
            "Endpoint set changes published by discovery",
            |s| s.counters.discovery_updates.load(Relaxed),
        ),
        (
            "wasp_cluster_discovery_errors_total",
            "Discovery failures (the last endpoint set stays)",
            |s| s.counters.discovery_errors.load(Relaxed),
        ),
    ];
    for (name, help, get) in cluster_counters {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
        for c in clusters {
            let _ = writeln!(out, "{name}{{cluster=\"{}\"}} {}", c.name, get(&c.state));
        }
    }
    let _ = writeln!(out, "# HELP wasp_cluster_requests_in_flight Requests to the cluster in flight.\n# TYPE wasp_cluster_requests_in_flight gauge");
    for c in clusters {
        let _ = writeln!(
            out,
            "wasp_cluster_requests_in_flight{{cluster=\"{}\"}} {}",
            c.name,
            c.state.in_flight.load(Relaxed)
        );
    }
    type EpGet = fn(&super::EndpointState, u64) -> f64;
    let endpoint_series: [(&str, &str, &str, EpGet); 7] = [
        (
            "wasp_endpoint_requests_total",
            "counter",
            "Tries sent to the endpoint",
            |e, _| e.requests.load(Relaxed) as f64,
        ),
        (
            "wasp_endpoint_failures_total",
            "counter",
            "Tries that failed (5xx, connect failure, reset, timeout)",
            |e, _| e.failures.load(Relaxed) as f64,
        ),
        (
            "wasp_endpoint_latency_seconds_total",
            "counter",
            "Summed time to response headers of the endpoint's tries",
            |e, _| e.latency_ns_total.load(Relaxed) as f64 / 1e9,
        ),
        (
            "wasp_endpoint_latency_estimate_seconds",
            "gauge",
            "Peak-EWMA latency estimate",
            |e, _| e.estimate_ns.load(Relaxed) as f64 / 1e9,
        ),
        (
            "wasp_endpoint_healthy",
            "gauge",
            "1 when health checks pass (or none are configured) and the endpoint is not ejected",
            |e, now| f64::from(u8::from(e.available(now))),
        ),
        (
            "wasp_endpoint_ejections_total",
            "counter",
            "Times outlier detection ejected the endpoint",
            |e, _| f64::from(e.ejections()),
        ),
        (
            "wasp_endpoint_requests_in_flight",
            "gauge",
            "Tries in flight",
            |e, _| e.in_flight.load(Relaxed).max(0) as f64,
        ),
    ];
    for (name, kind, help, get) in endpoint_series {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for c in clusters {
            for ep in &c.state.endpoints().endpoints {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                    c.name,
                    ep.addr,
                    get(ep, now)
                );
            }
        }
    }
}
