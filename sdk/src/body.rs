//! Body access for the current body callback: read the bytes the proxy holds
//! and replace them.
//!
//! The proxy hands a filter one chunk at a time. To see the whole body, return
//! [`Action::Pause`](crate::Action::Pause) from the body hook until
//! `end_of_stream()` is true: the proxy keeps buffering (up to its configured
//! body limit) and calls again with everything received so far. Replacing the
//! body on the last call replaces what goes on.
//!
//! Reads and writes pass the exact size the proxy announced for this callback
//! (start 0, size = buffered bytes), which every Proxy-Wasm host accepts.

use crate::abi::BufferType;
use crate::host;

/// Reads `size` bytes (the whole current buffer).
pub(crate) fn read(which: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    host::with(|h| h.buffer(which, 0, size)).unwrap_or_default()
}

/// Replaces the current buffer of `size` bytes with `bytes`.
pub(crate) fn replace(which: BufferType, size: usize, bytes: &[u8]) {
    if let Err(s) = host::with(|h| h.set_buffer(which, 0, size, bytes)) {
        crate::debug!("replacing {which:?} failed: {s}");
    }
}
