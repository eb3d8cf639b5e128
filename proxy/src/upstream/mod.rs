//! Upstreams: per-worker connection pools and balancers for each cluster.
//!
//! Each worker builds its own [`Upstreams`] from the config snapshot, so a
//! pool and a balancer are only ever touched by the thread that owns them.
//! The pool is hyper-util's client (keep-alive, HTTP/1.1 or prior-knowledge
//! HTTP/2 per cluster); the endpoint choice is made here, before the pool
//! sees the request, by rewriting the request's URI to the endpoint address.

pub mod balance;
mod callout;
mod connector;

pub use callout::Callouts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{ClusterConfig, Config, UpstreamProtocol};
use crate::telemetry::Metrics;
use balance::{Balancer, PickContext};
use connector::CountingConnector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type requests are sent upstream with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// One worker's view of every cluster, indexed by cluster id.
#[derive(Debug)]
pub struct Upstreams {
    clusters: Vec<Upstream>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub timeout: Option<Duration>,
    client: Client<CountingConnector, ProxyBody>,
    balancer: Box<dyn Balancer>,
}

impl Upstreams {
    pub fn build(config: &Config, metrics: &Metrics) -> Self {
        Self {
            clusters: config
                .clusters
                .iter()
                .map(|c| Upstream::new(c, metrics))
                .collect(),
        }
    }

    pub fn get(&self, id: usize) -> Option<&Upstream> {
        self.clusters.get(id)
    }

    pub fn by_name(&self, name: &str) -> Option<&Upstream> {
        self.clusters.iter().find(|c| &*c.name == name)
    }
}

impl Upstream {
    fn new(config: &ClusterConfig, metrics: &Metrics) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.enforce_http(true);
        if let Some(tls) = &config.tls {
            tls.start(metrics);
        }
        let connector = CountingConnector::new(
            http,
            metrics.upstream_stats(&config.name),
            config.tls.clone(),
            config.connect_timeout,
        );
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .http2_only(config.protocol == UpstreamProtocol::Http2);
        Self {
            name: config.name.clone(),
            protocol: config.protocol,
            timeout: config.timeout,
            client: builder.build(connector),
            balancer: balance::for_cluster(config.balance, &config.endpoints),
        }
    }

    pub fn pick(&self, ctx: &PickContext) -> Option<SocketAddr> {
        self.balancer.pick(ctx)
    }

    /// Sends `req`, whose URI must already name the endpoint.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }
}
