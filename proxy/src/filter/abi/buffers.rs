//! Buffer host functions (`proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`,
//! legacy `proxy_get_configuration`).
//!
//! Runs inside a host call on the VM's thread. Buffers: the body of the
//! running body callback (request or response; the whole buffered body when
//! a filter paused), a network filter's downstream or upstream data (the
//! same buffer, request side = downstream), the `http_call` answer body or
//! gRPC message, VM and plugin configuration. A buffer that does not exist
//! now reads as NOT_FOUND and
//! ignores writes with OK.

use bytes::BytesMut;
use wasmtime::Caller;

use super::memory::{self, copy_out, copy_out_with, HostResult};
use super::{fail_request, Status};
use crate::filter::host::{Dir, Host};
use crate::filter::metrics::Limit;

const REQUEST_BODY: i32 = 0;
const RESPONSE_BODY: i32 = 1;
const DOWNSTREAM_DATA: i32 = 2;
const UPSTREAM_DATA: i32 = 3;
const CALL_RESPONSE_BODY: i32 = 4;
const GRPC_RECEIVE_BUFFER: i32 = 5;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;

/// The bytes of buffer `kind`, borrowed (never copied whole).
fn buffer(h: &Host, kind: i32) -> Option<&[u8]> {
    match kind {
        REQUEST_BODY | RESPONSE_BODY | DOWNSTREAM_DATA | UPSTREAM_DATA => {
            let want = direction(kind)?;
            let s = h.stream()?;
            (s.body_dir == Some(want)).then_some(&s.body[..])
        }
        CALL_RESPONSE_BODY | GRPC_RECEIVE_BUFFER => h.answer.as_ref().map(|a| &a.body[..]),
        VM_CONFIGURATION => Some(&h.plugin.vm_config[..]),
        PLUGIN_CONFIGURATION => h.plugin_config().map(|b| &b[..]),
        _ => None,
    }
}

/// The side a body or data buffer belongs to.
fn direction(kind: i32) -> Option<Dir> {
    match kind {
        REQUEST_BODY | DOWNSTREAM_DATA => Some(Dir::Request),
        RESPONSE_BODY | UPSTREAM_DATA => Some(Dir::Response),
        _ => None,
    }
}

/// `[start, start+max)` of a buffer of `len` bytes, clamped.
fn window(len: usize, start: i32, max: i32) -> std::ops::Range<usize> {
    let start = (start as u32 as usize).min(len);
    let end = start.saturating_add(max as u32 as usize).min(len);
    start..end
}

/// `proxy_get_buffer_bytes`: copies only the window `[start, start+max)`,
/// straight from the host's buffer into the guest's allocation.
pub(crate) fn get(
    c: &mut Caller<'_, Host>,
    kind: i32,
    start: i32,
    max: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let Some(len) = buffer(c.data(), kind).map(<[u8]>::len) else {
        return Ok(Status::NotFound);
    };
    let range = window(len, start, max);
    let n = range.len();
    copy_out_with(c, n, ptr_out, len_out, |h, dst| {
        // The guest's allocator ran in between: the buffer is re-read, and
        // anything that changed its length leaves `dst` zeroed.
        match buffer(h, kind).and_then(|b| b.get(range)) {
            Some(src) if src.len() == dst.len() => dst.copy_from_slice(src),
            _ => dst.fill(0),
        }
    })
}

/// `proxy_get_buffer_status`: the buffer's size.
pub(crate) fn status(
    c: &mut Caller<'_, Host>,
    kind: i32,
    size_out: i32,
    flags_out: i32,
) -> HostResult {
    let Some(len) = buffer(c.data(), kind).map(<[u8]>::len) else {
        return Ok(Status::NotFound);
    };
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let r = memory::write_u32(c, size_out, len).and_then(|()| memory::write_u32(c, flags_out, 0));
    Ok(match r {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn get_configuration(
    c: &mut Caller<'_, Host>,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    // A root context with no config of its own is a bug: the callback
    // fails (and the filter with it, by its policy) rather than read
    // another root's config.
    let Some(cfg) = c.data().plugin_config().cloned() else {
        return Err(wasmtime::Error::msg(
            "proxy_get_configuration: this root context has no config",
        ));
    };
    copy_out(c, &cfg, ptr_out, len_out)
}

/// Replaces `[start, start+size)` of the body with the given bytes (clamped:
/// `start` past the end appends; `size` 0 inserts). A body may not grow
/// past `max_body_bytes`: the SDK accepts only OK here, so that fails the
/// request by the filter's policy.
pub(crate) fn set(
    c: &mut Caller<'_, Host>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let Some(want) = direction(kind) else {
        return Ok(memory::check(c, ptr, len).map_or_else(|s| s, |()| Status::Ok));
    };
    let max = usize::try_from(c.data().plugin.max_body_bytes).unwrap_or(usize::MAX);
    let (old_len, range) = match c.data().stream() {
        Some(s) if s.body_dir == Some(want) => (s.body.len(), window(s.body.len(), start, size)),
        _ => return Ok(memory::check(c, ptr, len).map_or_else(|s| s, |()| Status::Ok)),
    };
    let new_len = old_len
        .saturating_sub(range.len())
        .saturating_add(len as u32 as usize);
    if new_len > max && new_len > old_len {
        if let Err(s) = memory::check(c, ptr, len) {
            return Ok(s);
        }
        let detail = format!("a body rewritten to {new_len} bytes (max_body_bytes {max})");
        return Err(fail_request(c, Limit::BodyBytes, &detail));
    }
    let data = match memory::read(c, ptr, len) {
        Ok(d) => d,
        Err(s) => return Ok(s),
    };
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(Status::Ok);
    };
    let body = &s.body;
    let (Some(head), Some(tail)) = (body.get(..range.start), body.get(range.end..)) else {
        return Ok(Status::Ok);
    };
    let mut new = BytesMut::with_capacity(new_len);
    new.extend_from_slice(head);
    new.extend_from_slice(&data);
    new.extend_from_slice(tail);
    s.body = new.freeze();
    Ok(Status::Ok)
}
