//! Logging to the proxy's log (`proxy_log`), at the proxy's levels.
//!
//! Use the macros [`trace!`](crate::trace), [`debug!`](crate::debug),
//! [`info!`](crate::info), [`warn!`](crate::warn) and
//! [`error!`](crate::error); they format like `format!`. The proxy decides
//! what is shown (its `[log] level`); the line is tagged with the filter name
//! by the host. Formatting happens in the guest, so keep hot-path logging at
//! `debug`/`trace` cheap or guarded by your own config flag.
//!
//! Under [`crate::testing`], every line is captured and can be asserted on.

use std::fmt;

/// A `proxy_log_level_t`.
///
/// ```
/// use wasp_sdk::log::Level;
/// assert!(Level::Error > Level::Info);
/// assert_eq!(Level::Warn.as_str(), "warn");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// TRACE (0).
    Trace = 0,
    /// DEBUG (1).
    Debug = 1,
    /// INFO (2).
    Info = 2,
    /// WARN (3).
    Warn = 3,
    /// ERROR (4).
    Error = 4,
    /// CRITICAL (5).
    Critical = 5,
}

impl Level {
    /// Lower-case name, as the proxy prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Critical => "critical",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sends one line to the proxy's log. The macros call this.
///
/// ```
/// wasp_sdk::log::log(wasp_sdk::log::Level::Info, format_args!("hello {}", 42));
/// ```
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    match args.as_str() {
        Some(s) => crate::host::with(|h| h.log(level, s)),
        None => {
            let s = fmt::format(args);
            crate::host::with(|h| h.log(level, &s))
        }
    }
}

/// Logs at TRACE level: `wasp_sdk::trace!("x = {}", x)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Trace, ::core::format_args!($($arg)+)) };
}

/// Logs at DEBUG level: `wasp_sdk::debug!("x = {}", x)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Debug, ::core::format_args!($($arg)+)) };
}

/// Logs at INFO level.
///
/// ```
/// wasp_sdk::info!("routed {} to {}", "/api", "reviews-v2");
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Info, ::core::format_args!($($arg)+)) };
}

/// Logs at WARN level: `wasp_sdk::warn!("slow upstream: {}ms", ms)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Warn, ::core::format_args!($($arg)+)) };
}

/// Logs at ERROR level: `wasp_sdk::error!("bad token: {}", e)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Error, ::core::format_args!($($arg)+)) };
}
