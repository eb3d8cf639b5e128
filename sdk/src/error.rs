//! The SDK's two error types: [`HostError`] (a host call failed) and
//! [`ConfigError`] (a filter refuses its configuration).

use crate::abi::Status;
use std::fmt;

/// A host function answered with a non-OK status.
///
/// ```
/// use wasp_sdk::{HostError, Status};
/// let e = HostError::new("proxy_http_call", Status::BadArgument);
/// assert_eq!(e.status(), Status::BadArgument);
/// assert!(e.to_string().contains("BAD_ARGUMENT"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    call: &'static str,
    status: Status,
}

impl HostError {
    /// An error from host function `call` with `status`.
    pub fn new(call: &'static str, status: Status) -> Self {
        Self { call, status }
    }

    /// The status the host returned.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The host function that failed, e.g. `proxy_http_call`.
    pub fn call(&self) -> &'static str {
        self.call
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.call, self.status)
    }
}

impl std::error::Error for HostError {}

/// Why a filter rejects its configuration. Returned from
/// [`Filter::configure`](crate::Filter::configure); the SDK logs it at error
/// level and answers `false` to `proxy_on_configure`, so the proxy refuses the
/// filter and shows the message.
///
/// ```
/// use wasp_sdk::ConfigError;
/// let e = ConfigError::new("rules[1]: percent must be within 0..=100");
/// assert_eq!(e.to_string(), "rules[1]: percent must be within 0..=100");
/// let e: ConfigError = "no rules".into();
/// assert_eq!(e.message(), "no rules");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    /// A configuration error with a message naming the field and the problem.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        Self { message }
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<HostError> for ConfigError {
    fn from(e: HostError) -> Self {
        Self::new(e.to_string())
    }
}
