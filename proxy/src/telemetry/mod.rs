//! Telemetry: the proxy's metrics, logging set-up and trace export.
//!
//! Metrics are recorded on worker threads through pre-resolved handles and
//! rendered on the control thread by the admin server.

pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod trace;

pub use metrics::{ListenerStats, Metrics, RequestStats, TcpStats, TlsErrors, UpstreamStats};
