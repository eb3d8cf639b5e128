//! DNS discovery with hickory-resolver on the control thread's runtime.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};

use crate::config::Endpoint;
use crate::upstream::cluster::ClusterState;

use super::DnsSettings;

fn resolver(settings: &DnsSettings) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match settings.nameserver {
        Some(ns) => {
            let mut config = ResolverConfig::new();
            config.add_name_server(NameServerConfig::new(ns, Protocol::Udp));
            TokioResolver::builder_with_config(config, provider)
        }
        None => TokioResolver::builder(provider)?,
    };
    // We schedule re-resolution by TTL ourselves; a cache would only
    // hand back the answer we already have.
    builder.options_mut().cache_size = 0;
    builder.options_mut().attempts = 2;
    builder.options_mut().timeout = Duration::from_secs(2);
    Ok(builder.build())
}

/// Resolves until the cluster is dropped.
pub async fn run(cluster: Weak<ClusterState>, settings: DnsSettings) {
    let resolver = match resolver(&settings) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(name = %settings.name, "DNS discovery cannot start: {e}");
            if let Some(state) = cluster.upgrade() {
                state
                    .discovery_error
                    .store(Some(std::sync::Arc::new(e.to_string())));
                state.discovered();
            }
            return;
        }
    };
    loop {
        let result = resolve(&resolver, &settings).await;
        let Some(state) = cluster.upgrade() else {
            return;
        };
        let wait = match result {
            Ok((endpoints, valid_until)) => {
                state.discovery_error.store(None);
                if state.set_endpoints(&endpoints) {
                    tracing::info!(
                        cluster = %state.name,
                        name = %settings.name,
                        endpoints = endpoints.len(),
                        "DNS discovery: endpoint set changed"
                    );
                }
                let ttl = valid_until.map_or(settings.refresh, |t| {
                    t.saturating_duration_since(Instant::now())
                });
                ttl.clamp(
                    settings.min_refresh,
                    settings.max_refresh.max(settings.min_refresh),
                )
            }
            Err(e) => {
                state
                    .counters
                    .discovery_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(cluster = %state.name, name = %settings.name, "DNS discovery failed, keeping the last endpoints: {e}");
                state.discovery_error.store(Some(std::sync::Arc::new(e)));
                settings
                    .refresh
                    .min(settings.max_refresh)
                    .max(settings.min_refresh)
            }
        };
        // Requests waiting for the first answer go on, whatever it was.
        state.discovered();
        drop(state);
        tokio::time::sleep(wait).await;
    }
}

/// The endpoints the name stands for now, and when the answer expires.
async fn resolve(
    resolver: &TokioResolver,
    settings: &DnsSettings,
) -> Result<(Vec<Endpoint>, Option<Instant>), String> {
    if !settings.srv {
        return match resolver.lookup_ip(settings.name.as_str()).await {
            Ok(lookup) => {
                let mut eps: Vec<Endpoint> = lookup
                    .iter()
                    .map(|ip| Endpoint {
                        addr: SocketAddr::new(ip, settings.port),
                        weight: 1,
                    })
                    .collect();
                eps.sort_by_key(|e| e.addr);
                Ok((eps, Some(lookup.valid_until())))
            }
            Err(e) if e.is_no_records_found() => Ok((Vec::new(), None)),
            Err(e) => Err(e.to_string()),
        };
    }
    let srv = match resolver.srv_lookup(settings.name.as_str()).await {
        Ok(srv) => srv,
        Err(e) if e.is_no_records_found() => return Ok((Vec::new(), None)),
        Err(e) => return Err(e.to_string()),
    };
    let mut valid_until = srv.as_lookup().valid_until();
    // Only the records of the best (lowest) priority are used, as RFC 2782 says.
    let best = srv.iter().map(|r| r.priority()).min();
    let mut eps = Vec::new();
    for record in srv.iter().filter(|r| Some(r.priority()) == best) {
        let target = record.target().to_utf8();
        match resolver.lookup_ip(target.as_str()).await {
            Ok(ips) => {
                valid_until = valid_until.min(ips.valid_until());
                for ip in ips.iter() {
                    eps.push(Endpoint {
                        addr: SocketAddr::new(ip, record.port()),
                        weight: u32::from(record.weight()).max(1),
                    });
                }
            }
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(format!("SRV target {target}: {e}")),
        }
    }
    eps.sort_by_key(|e| e.addr);
    Ok((eps, Some(valid_until)))
}
