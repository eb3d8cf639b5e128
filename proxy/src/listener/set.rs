//! The live listener set: which listeners are bound, and how a reload
//! changes them without touching the ones it keeps.
//!
//! Owned by the control thread (the reload loop). Workers receive the
//! sockets of added listeners over a per-worker channel and serve them like
//! the ones bound at start-up. A listener is identified by its name and
//! configured address: same name and address means "kept" (its sockets and
//! open connections stay, and its routes, pipeline, limits and TLS settings
//! come from each new snapshot); anything else is a removal plus an
//! addition.
//!
//! A reload changes the set in three steps so that it stays all or nothing:
//! [`ListenerSet::plan`] binds every added listener on every worker before
//! anything changes (a taken port rejects the whole reload);
//! [`ListenerSet::retire`] stops the removed ones accepting and tells their
//! connections to close after their current request, just before the swap;
//! [`ListenerSet::start`] hands the new sockets to the workers right after
//! it. Only `plan` can fail.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::Config;

/// How long a reload waits for the workers to stop accepting on removed
/// listeners before swapping anyway (a worker stuck that long has bigger
/// problems; its removed listener then drains after the swap).
const RETIRE_WAIT: Duration = Duration::from_secs(1);

/// One listening socket for one worker, with what it needs to serve.
#[derive(Debug)]
pub struct Serve {
    pub name: Arc<str>,
    /// The app's HTTP proxy listener, which drains last at shutdown.
    pub outbound: bool,
    pub socket: std::net::TcpListener,
    pub retire: Retire,
}

/// Tells a listener's serve loops it was removed by a reload; each answers
/// on `ack` once it stopped accepting and signalled its connections.
#[derive(Debug)]
pub struct Retire {
    pub signal: watch::Receiver<bool>,
    pub ack: mpsc::UnboundedSender<()>,
}

/// The control thread's handle on every bound listener.
#[derive(Debug)]
pub struct ListenerSet {
    workers: Vec<mpsc::UnboundedSender<Serve>>,
    /// Name of the listener that drains last (wrapper mode's `HTTP_PROXY`).
    outbound: Arc<str>,
    /// Wrapper mode: the app was started with the outbound listener's
    /// address in its environment, so a reload must not move or remove it.
    outbound_pinned: bool,
    bound: Vec<Bound>,
}

#[derive(Debug)]
struct Bound {
    name: Arc<str>,
    /// As configured (port 0 stays 0), which is what a reload compares.
    bind: SocketAddr,
    /// The address actually bound.
    local: SocketAddr,
    retire: watch::Sender<bool>,
    acks: mpsc::UnboundedReceiver<()>,
}

/// What a reload will do to the listener set, with the added listeners
/// already bound.
#[derive(Debug, Default)]
pub struct Plan {
    added: Vec<Added>,
    /// Positions in `bound`.
    removed: Vec<usize>,
}

#[derive(Debug)]
struct Added {
    bound: Bound,
    /// One per worker, in worker order.
    serves: Vec<Serve>,
}

/// Per worker: the sockets bound at start-up and the channel later ones arrive on.
pub type WorkerListeners = (Vec<Serve>, mpsc::UnboundedReceiver<Serve>);

impl ListenerSet {
    /// Start-up: binds every listener of `config` on every worker.
    pub fn bind(config: &Config, outbound: &str) -> anyhow::Result<(Self, Vec<WorkerListeners>)> {
        let workers = config.workers.max(1);
        let mut senders = Vec::with_capacity(workers);
        let mut per_worker: Vec<WorkerListeners> = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            per_worker.push((Vec::new(), rx));
        }
        let mut set = Self {
            workers: senders,
            outbound: Arc::from(outbound),
            outbound_pinned: false,
            bound: Vec::new(),
        };
        for l in &config.listeners {
            let added = set
                .bind_one(&l.name, l.bind)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(listener = %l.name, bind = %added.bound.local, workers, "listening");
            for (w, serve) in added.serves.into_iter().enumerate() {
                per_worker[w].0.push(serve);
            }
            set.bound.push(added.bound);
        }
        Ok((set, per_worker))
    }

    /// Binds what `new` adds or re-binds; changes nothing that runs. On error
    /// the sockets bound so far are closed again.
    pub fn plan(&self, new: &Config) -> Result<Plan, String> {
        let mut plan = Plan::default();
        for (i, b) in self.bound.iter().enumerate() {
            let kept = new
                .listeners
                .iter()
                .any(|l| l.name == b.name && l.bind == b.bind);
            if !kept {
                if self.outbound_pinned && b.name == self.outbound {
                    return Err(format!(
                        "listener \"{}\" ({}) is the HTTP_PROXY address the app was started with: removing or moving it needs a restart (nothing was applied)",
                        b.name, b.local
                    ));
                }
                plan.removed.push(i);
            }
        }
        for l in &new.listeners {
            let kept = self
                .bound
                .iter()
                .any(|b| b.name == l.name && b.bind == l.bind);
            if !kept {
                plan.added.push(self.bind_one(&l.name, l.bind)?);
            }
        }
        Ok(plan)
    }

    /// Wrapper mode: the app's environment names the outbound listener's
    /// address, so reloads keep that listener where it is.
    pub fn pin_outbound(&mut self) {
        self.outbound_pinned = true;
    }

    /// Before the swap: the removed listeners stop accepting and their
    /// connections are told to close after their current request (they
    /// drain within `drain_timeout` on their workers). Waits (at most
    /// `RETIRE_WAIT`) until every worker has done so. A request whose head
    /// was still arriving then finds no listener in the new snapshot and is
    /// answered 503 `listener_removed`.
    pub async fn retire(&mut self, plan: &Plan) {
        let workers = self.workers.len();
        // Signal every removed listener first, then wait for all of them
        // under one deadline: a stuck worker costs the reload RETIRE_WAIT
        // once, not once per listener.
        for &i in &plan.removed {
            self.bound[i].retire.send_replace(true);
        }
        let deadline = tokio::time::Instant::now() + RETIRE_WAIT;
        for &i in &plan.removed {
            let b = &mut self.bound[i];
            let waited = tokio::time::timeout_at(deadline, async {
                for _ in 0..workers {
                    if b.acks.recv().await.is_none() {
                        // Every serve loop already ended (shutdown).
                        break;
                    }
                }
            })
            .await;
            if waited.is_err() {
                tracing::warn!(listener = %b.name, "a worker did not stop accepting within {RETIRE_WAIT:?}; swapping anyway");
            }
            tracing::info!(listener = %b.name, bind = %b.bind, "listener removed: no longer accepting, open connections drain");
        }
    }

    /// After the swap: the workers start serving the added listeners.
    pub fn start(&mut self, plan: Plan) {
        let mut removed = plan.removed;
        removed.sort_unstable();
        for i in removed.into_iter().rev() {
            self.bound.remove(i);
        }
        for added in plan.added {
            for (tx, serve) in self.workers.iter().zip(added.serves) {
                // A worker that has stopped taking listeners is shutting down.
                let _ = tx.send(serve);
            }
            let b = &added.bound;
            tracing::info!(listener = %b.name, bind = %b.local, "listener added by reload: listening");
            self.bound.push(added.bound);
        }
    }

    /// One socket per worker for `name` on `bind`.
    fn bind_one(&self, name: &Arc<str>, bind: SocketAddr) -> Result<Added, String> {
        let sockets = super::bind(bind, self.workers.len())
            .map_err(|e| format!("listener \"{name}\": cannot bind {bind}: {e}"))?;
        let local = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(bind);
        let (retire, signal) = watch::channel(false);
        let (ack, acks) = mpsc::unbounded_channel();
        let outbound = **name == *self.outbound;
        let serves = sockets
            .into_iter()
            .map(|socket| Serve {
                name: name.clone(),
                outbound,
                socket,
                retire: Retire {
                    signal: signal.clone(),
                    ack: ack.clone(),
                },
            })
            .collect();
        Ok(Added {
            bound: Bound {
                name: name.clone(),
                bind,
                local,
                retire,
                acks,
            },
            serves,
        })
    }
}

impl Plan {
    /// True when the listener set stays as it is.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}
