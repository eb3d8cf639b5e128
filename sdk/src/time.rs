//! The proxy's clock. Hosts may freeze it per callback; under
//! [`crate::testing`] it only moves when the test says so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, as the proxy sees them.
pub fn now_nanos() -> u64 {
    crate::host::with(|h| h.now_nanos())
}

/// The current time.
///
/// ```
/// let t = wasp_sdk::time::now();
/// assert!(t >= std::time::UNIX_EPOCH);
/// ```
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(now_nanos())
}
