//! Shared data: a key-value store the proxy keeps across all VMs of the
//! filter (all workers), with compare-and-swap for safe updates.
//!
//! Every access is a host call that copies the value, so keep values small
//! and avoid it on every request where a per-VM cache would do.
//!
//! ```
//! use wasp_sdk::shared;
//! // Count something across workers, retrying when another worker wins the race.
//! let _ = shared::update("hits", |old| {
//!     let n = old.and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok()).unwrap_or(0);
//!     (n + 1).to_string().into_bytes()
//! });
//! ```

use crate::{host, HostError, Status};

/// The version stamp returned with a value; pass it back to [`set`] to write
/// only if nobody changed the value since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cas(pub(crate) u32);

/// Why a shared-data write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedError {
    /// Someone else wrote the key since you read it.
    CasMismatch,
    /// Any other host failure.
    Host(HostError),
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedError::CasMismatch => {
                f.write_str("shared data changed concurrently (CAS mismatch)")
            }
            SharedError::Host(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SharedError {}

/// Reads `key`: its value and CAS stamp, or `None` if unset.
pub fn get(key: &str) -> Result<Option<(Vec<u8>, Cas)>, HostError> {
    host::with(|h| h.shared_data(key))
        .map(|o| o.map(|(v, c)| (v, Cas(c))))
        .map_err(|s| HostError::new("proxy_get_shared_data", s))
}

/// Writes `key`. With `Some(cas)`, only if the stamp still matches.
pub fn set(key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), SharedError> {
    match host::with(|h| h.set_shared_data(key, value, cas.map_or(0, |c| c.0))) {
        Ok(()) => Ok(()),
        Err(Status::CasMismatch) => Err(SharedError::CasMismatch),
        Err(s) => Err(SharedError::Host(HostError::new(
            "proxy_set_shared_data",
            s,
        ))),
    }
}

/// Read-modify-write with CAS, retried up to 16 times. Returns the value
/// written.
pub fn update(
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Vec<u8>,
) -> Result<Vec<u8>, SharedError> {
    let mut last = SharedError::CasMismatch;
    for _ in 0..16 {
        let current = get(key).map_err(SharedError::Host)?;
        let (old, cas) = match &current {
            Some((v, c)) => (Some(v.as_slice()), Some(*c)),
            None => (None, None),
        };
        let new = f(old);
        match set(key, &new, cas) {
            Ok(()) => return Ok(new),
            Err(e @ SharedError::CasMismatch) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}
