//! The process's lifecycle: readiness, the shutdown request and the drain
//! signals. One [`Lifecycle`] per process, made by `server`; `admin` reads
//! readiness and asks for shutdown, listeners watch their drain signal,
//! `reload` refuses to apply once draining. Depends on nothing else here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Lifecycle {
    /// Listeners bound and everything loaded; false again once draining.
    ready: AtomicBool,
    draining: AtomicBool,
    /// Turns true when a shutdown starts (signal or admin); the control
    /// thread then runs the drain sequence.
    shutdown: watch::Sender<bool>,
    /// Tell inbound / outbound listeners to stop accepting and drain.
    drain_inbound: watch::Sender<bool>,
    drain_outbound: watch::Sender<bool>,
    started: Instant,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            drain_inbound: watch::channel(false).0,
            drain_outbound: watch::channel(false).0,
            started: Instant::now(),
        }
    }
}

impl Lifecycle {
    /// Starts a graceful shutdown; safe to call more than once.
    pub fn begin_shutdown(&self, why: &str) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("shutting down ({why}): draining in-flight requests");
            self.ready.store(false, Ordering::Release);
            self.shutdown.send_replace(true);
        }
    }

    /// Everything is bound and loaded: `/ready` may say so.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Turns true when a shutdown has been asked for.
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Turns true when the outbound (or inbound) listeners must drain.
    pub fn drain_signal(&self, outbound: bool) -> watch::Receiver<bool> {
        self.drain_sender(outbound).subscribe()
    }

    /// Tells the outbound (or inbound) listeners to stop accepting and drain.
    pub fn start_drain(&self, outbound: bool) {
        self.drain_sender(outbound).send_replace(true);
    }

    fn drain_sender(&self, outbound: bool) -> &watch::Sender<bool> {
        if outbound {
            &self.drain_outbound
        } else {
            &self.drain_inbound
        }
    }
}

/// Completes once a listener's drain deadline has passed (`close` turned
/// true). A serve loop that ended without sending it (a panic) leaves its
/// connections running, as `server::report_serve_end` promises.
pub async fn drain_deadline_passed(mut close: watch::Receiver<bool>) {
    if close.wait_for(|closed| *closed).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_starts_once_and_ends_readiness() {
        let l = Lifecycle::default();
        let asked = l.shutdown_requested();
        l.set_ready();
        assert!(l.is_ready() && !l.is_draining());
        l.begin_shutdown("test");
        l.begin_shutdown("again");
        assert!(!l.is_ready() && l.is_draining());
        assert!(*asked.borrow());
    }

    #[test]
    fn inbound_and_outbound_drain_separately() {
        let l = Lifecycle::default();
        let (inbound, outbound) = (l.drain_signal(false), l.drain_signal(true));
        l.start_drain(false);
        assert!(*inbound.borrow());
        assert!(!*outbound.borrow());
        l.start_drain(true);
        assert!(*outbound.borrow());
    }
}
