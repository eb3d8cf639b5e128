//! The upstream work of the control thread: starts each cluster's
//! discovery and health-check tasks (once per cluster state, so a reload
//! that brings new clusters gets them started) and ends ejections whose
//! time is over.
//!
//! One task on the control runtime, ticking every [`TICK`]; it reads the
//! current snapshot and touches only atomics and the clusters' `ArcSwap`s.
//! Never on a worker.

use std::sync::Arc;
use std::time::Duration;

use super::balance::now_nanos;
use super::{health, outlier, ClusterState};

/// How often ejections are checked for expiry (their resolution).
pub const TICK: Duration = Duration::from_millis(100);

/// Runs until the process ends; `clusters` gives the current generation's
/// cluster states.
pub async fn run<F>(clusters: F)
where
    F: Fn() -> Vec<Arc<ClusterState>>,
{
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for state in &clusters() {
            if state.claim_start() {
                state.settings.discovery.spawn(Arc::downgrade(state));
                if let Some(h) = &state.settings.health {
                    tokio::spawn(health::run(Arc::downgrade(state), h.clone()));
                }
            }
            if state.settings.outlier.is_some() {
                outlier::expire(state, now_nanos());
            }
        }
    }
}
