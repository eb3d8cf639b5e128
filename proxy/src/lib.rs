//! wasp: a WebAssembly-pluggable sidecar proxy.
//!
//! Traffic flows one way through the modules: `listener` accepts,
//! `forward` routes (`route`) and sends upstream (`upstream`), and the
//! response comes back the same way. `server` owns the threads and the
//! snapshots they read; `admin` and `telemetry` look on from the side.

#![deny(unsafe_code)]

pub mod admin;
pub mod await_ready;
pub mod capture;
pub mod certs;
pub mod cli;
pub mod config;
pub mod errors;
pub mod filter;
pub mod filtertest;
pub mod forward;
pub mod l4;
pub mod lifecycle;
pub mod listener;
pub mod reload;
pub mod route;
pub mod scaffold;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;
