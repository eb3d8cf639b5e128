//! Discovery: where a cluster's endpoints come from, and the control-thread
//! tasks that keep them current.
//!
//! - `Static`: the `endpoints` list of the config, fixed for the config's
//!   lifetime.
//! - `Dns`: A/AAAA records of a name (or SRV records and their targets),
//!   re-resolved when the answer's TTL runs out, clamped to
//!   `[min_refresh, max_refresh]`; after a failure the last good set stays.
//! - `File`: a watched TOML or JSON file listing endpoints, so any agent can
//!   publish them; a file that fails to parse changes nothing.
//!
//! Every task runs on the control thread and publishes through
//! [`ClusterState::set_endpoints`], which swaps the cluster's endpoint set
//! and bumps its version; workers pick that up on their next request.
//! Endpoints that disappear are drained: requests already sent to them
//! finish, their idle pooled connections time out. A task ends when its
//! cluster's state is dropped.

mod dns;
mod file;

use std::sync::Weak;

pub use file::read_endpoints_file;

use super::cluster::ClusterState;

pub use crate::config::cluster::{
    parse_nameserver, Discovery, DnsSettings, DEFAULT_MIN_REFRESH, DEFAULT_REFRESH,
};

impl Discovery {
    /// Starts the task that keeps `cluster` current (control thread).
    pub fn spawn(&self, cluster: Weak<ClusterState>) {
        match self {
            Discovery::Static => {}
            Discovery::Dns(settings) => {
                tokio::spawn(dns::run(cluster, settings.clone()));
            }
            Discovery::File(path) => {
                tokio::spawn(file::run(cluster, path.clone()));
            }
        }
    }
}
