//! Active health checks: an HTTP/1.1 `GET path` to every endpoint of a
//! cluster each `interval`; a 2xx within `timeout` is a success.
//! `unhealthy` failures in a row mark the endpoint unhealthy, `healthy`
//! successes in a row mark it healthy again; each change bumps the
//! cluster version so workers rebuild their balancers.
//!
//! Runs on the control thread, one task per cluster, ending when the
//! cluster's state is dropped (a reload replaced it). Checks go over plain
//! TCP, with their own connection each time (so a check also proves the
//! endpoint still accepts connections); TLS clusters are checked in
//! plaintext, so give them a plaintext health port or rely on outlier
//! detection.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::cluster::ClusterState;

pub use crate::config::cluster::HealthSettings;

/// Checks `cluster` until it is dropped (control thread).
pub async fn run(cluster: Weak<ClusterState>, settings: HealthSettings) {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(Some(settings.timeout));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = cluster.upgrade() else {
            return;
        };
        let set = state.endpoints();
        let checks = set.endpoints.iter().map(|ep| {
            let client = client.clone();
            let settings = &settings;
            let ep = ep.clone();
            async move {
                let ok = check(&client, ep.addr, settings).await;
                (ep, ok)
            }
        });
        let results = futures_util::future::join_all(checks).await;
        for (ep, ok) in results {
            apply(&state, &ep, ok, &settings);
        }
    }
}

async fn check(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    settings: &HealthSettings,
) -> bool {
    let Ok(req) = http::Request::get(format!("http://{addr}{}", settings.path))
        .header(http::header::USER_AGENT, "wasp-health-check")
        .body(Empty::new())
    else {
        return false;
    };
    match tokio::time::timeout(settings.timeout, client.request(req)).await {
        Ok(Ok(resp)) => resp.status().is_success(),
        _ => false,
    }
}

/// Folds one check result into the endpoint's streaks and verdict.
pub(crate) fn apply(
    state: &ClusterState,
    ep: &Arc<super::cluster::EndpointState>,
    ok: bool,
    s: &HealthSettings,
) {
    use std::sync::atomic::Ordering::Relaxed;
    if ok {
        ep.check_streak_failed.store(0, Relaxed);
        let n = ep.check_streak_ok.fetch_add(1, Relaxed) + 1;
        if !ep.healthy() && n >= s.healthy && ep.set_healthy(true) {
            tracing::info!(cluster = %state.name, endpoint = %ep.addr, "health check: healthy again");
            state.bump();
        }
    } else {
        ep.check_streak_ok.store(0, Relaxed);
        let n = ep.check_streak_failed.fetch_add(1, Relaxed) + 1;
        if ep.healthy() && n >= s.unhealthy && ep.set_healthy(false) {
            tracing::warn!(cluster = %state.name, endpoint = %ep.addr, failures = n, "health check: unhealthy");
            state.bump();
        }
    }
}
