//! Buffer host functions (`proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`,
//! legacy `proxy_get_configuration`).
//!
//! Runs inside a host call on the VM's thread. Buffers: the body of the
//! running body callback (request or response; the whole buffered body when
//! a filter paused), the `http_call` answer body, VM and plugin
//! configuration. A buffer that does not exist now reads as NOT_FOUND and
//! ignores writes with OK.

use bytes::{Bytes, BytesMut};
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::{Dir, Host};

const REQUEST_BODY: i32 = 0;
const RESPONSE_BODY: i32 = 1;
const CALL_RESPONSE_BODY: i32 = 4;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;

fn buffer(h: &Host, kind: i32) -> Option<Bytes> {
    match kind {
        REQUEST_BODY | RESPONSE_BODY => {
            let want = if kind == REQUEST_BODY {
                Dir::Request
            } else {
                Dir::Response
            };
            let s = h.stream()?;
            (s.body_dir == Some(want)).then(|| Bytes::copy_from_slice(&s.body))
        }
        CALL_RESPONSE_BODY => h.answer.as_ref().map(|a| a.body.clone()),
        VM_CONFIGURATION => Some(h.plugin.vm_config.clone()),
        PLUGIN_CONFIGURATION => Some(h.plugin.config.clone()),
        _ => None,
    }
}

pub(crate) fn get(
    c: &mut Caller<'_, Host>,
    kind: i32,
    start: i32,
    max: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let Some(buf) = buffer(c.data(), kind) else {
        return Ok(Status::NotFound);
    };
    let start = (start as u32 as usize).min(buf.len());
    let end = start.saturating_add(max as u32 as usize).min(buf.len());
    copy_out(c, &buf[start..end], ptr_out, len_out)
}

/// `proxy_get_buffer_status`: the buffer's size.
pub(crate) fn status(
    c: &mut Caller<'_, Host>,
    kind: i32,
    size_out: i32,
    flags_out: i32,
) -> HostResult {
    let Some(len) = buffer(c.data(), kind).map(|b| b.len()) else {
        return Ok(Status::NotFound);
    };
    let r = memory::write_u32(c, size_out, len as u32)
        .and_then(|()| memory::write_u32(c, flags_out, 0));
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
    let cfg = c.data().plugin.config.clone();
    copy_out(c, &cfg, ptr_out, len_out)
}

/// Replaces `[start, start+size)` of the body with the given bytes (clamped:
/// `start` past the end appends; `size` 0 inserts).
pub(crate) fn set(
    c: &mut Caller<'_, Host>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let data = match memory::read(c, ptr, len) {
        Ok(d) => d,
        Err(s) => return Ok(s),
    };
    let want = match kind {
        REQUEST_BODY => Dir::Request,
        RESPONSE_BODY => Dir::Response,
        _ => return Ok(Status::Ok),
    };
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(Status::Ok);
    };
    if s.body_dir != Some(want) {
        return Ok(Status::Ok);
    }
    let body = &s.body;
    let start = (start as u32 as usize).min(body.len());
    let end = start.saturating_add(size as u32 as usize).min(body.len());
    let mut new = BytesMut::with_capacity(body.len() - (end - start) + data.len());
    new.extend_from_slice(&body[..start]);
    new.extend_from_slice(&data);
    new.extend_from_slice(&body[end..]);
    s.body = new;
    Ok(Status::Ok)
}
