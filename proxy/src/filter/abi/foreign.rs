//! `proxy_call_foreign_function`: the host-specific functions community
//! filters call on Envoy, where they make sense in wasp.
//!
//! - `clear_route_cache`: OK with an empty result. Envoy recomputes the
//!   route after a filter changed what routing reads; wasp routes after the
//!   request-header callbacks anyway, so every change made there is seen.
//! - anything else: NOT_FOUND, as Envoy answers for a name it does not know
//!   (the Rust SDK has no variant for UNIMPLEMENTED and would trap on it).
//!
//! Runs inside a host call on the VM's thread.

use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::Host;

/// Longest function name read from the guest.
const MAX_NAME: usize = 256;

pub(crate) fn call(
    c: &mut Caller<'_, Host>,
    np: i32,
    nl: i32,
    ap: i32,
    al: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    if let Err(s) = memory::check(c, ap, al) {
        return Ok(s);
    }
    let name = match memory::read_at_most(c, np, nl, MAX_NAME) {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(Status::NotFound),
        Err(s) => return Ok(s),
    };
    match &name[..] {
        b"clear_route_cache" => copy_out(c, &[], ptr_out, len_out),
        _ => Ok(Status::NotFound),
    }
}
