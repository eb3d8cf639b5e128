//! Load balancers: given a cluster's endpoints, pick one for a request.
//!
//! A balancer lives in one worker (each worker owns its own instance per
//! cluster), so it needs no synchronisation beyond what its own bookkeeping
//! wants; `pick` is on the request path and must not allocate. New
//! algorithms implement [`Balancer`] and are added to [`for_cluster`].

mod round_robin;

use std::net::SocketAddr;

use crate::config::{Balance, Endpoint};

pub use round_robin::RoundRobin;

/// What a balancer may look at when picking. Grows as balancers need more
/// (a hash key, the request's headers).
#[derive(Debug, Default)]
pub struct PickContext {}

pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The endpoint for the next request, or `None` when there is none.
    fn pick(&self, ctx: &PickContext) -> Option<SocketAddr>;
}

/// The balancer a cluster's config asks for.
pub fn for_cluster(kind: Balance, endpoints: &[Endpoint]) -> Box<dyn Balancer> {
    match kind {
        Balance::RoundRobin => Box::new(RoundRobin::new(endpoints)),
    }
}
