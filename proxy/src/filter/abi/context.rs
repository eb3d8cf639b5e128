//! Context and stream-control host functions: logging, time, tick period,
//! continue/close stream, local responses, `proxy_get_status`, effective
//! context, `proxy_done`, and the answers of everything this host does not
//! implement (gRPC, shared queues, foreign functions).
//!
//! Runs inside a host call on the VM's thread. Nothing here re-enters the
//! guest: requests to continue, close or answer locally are recorded in
//! `Host::actions` and carried out after the callback returns.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::Caller;

use super::headers::deserialize;
use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::{Host, LocalResponse};

pub(crate) fn log(c: &mut Caller<'_, Host>, level: i32, ptr: i32, len: i32) -> HostResult {
    use tracing::Level;
    // A chatty filter costs nothing when its level is off: do not even copy.
    let enabled = match level {
        0 => tracing::enabled!(target: "wasp::filter::guest", Level::TRACE),
        1 => tracing::enabled!(target: "wasp::filter::guest", Level::DEBUG),
        2 => tracing::enabled!(target: "wasp::filter::guest", Level::INFO),
        3 => tracing::enabled!(target: "wasp::filter::guest", Level::WARN),
        _ => tracing::enabled!(target: "wasp::filter::guest", Level::ERROR),
    };
    if !enabled {
        return Ok(match memory::check(c, ptr, len) {
            Ok(()) => Status::Ok,
            Err(s) => s,
        });
    }
    let msg = match memory::read_str(c, ptr, len) {
        Ok(m) => m,
        Err(s) => return Ok(s),
    };
    let filter = &*c.data().plugin.name;
    match level {
        0 => tracing::trace!(target: "wasp::filter::guest", filter, "{msg}"),
        1 => tracing::debug!(target: "wasp::filter::guest", filter, "{msg}"),
        2 => tracing::info!(target: "wasp::filter::guest", filter, "{msg}"),
        3 => tracing::warn!(target: "wasp::filter::guest", filter, "{msg}"),
        _ => tracing::error!(target: "wasp::filter::guest", filter, "{msg}"),
    }
    Ok(Status::Ok)
}

pub(crate) fn get_log_level(c: &mut Caller<'_, Host>, out: i32) -> HostResult {
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        LevelFilter::ERROR => 4,
        _ => 5,
    };
    Ok(match memory::write_u32(c, out, level) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn current_time(c: &mut Caller<'_, Host>, out: i32) -> HostResult {
    Ok(match memory::write_u64(c, out, now_nanos()) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn set_tick_period(c: &mut Caller<'_, Host>, ms: i32) -> HostResult {
    c.data_mut().tick_period_ms = ms as u32;
    Ok(Status::Ok)
}

pub(crate) fn continue_stream(c: &mut Caller<'_, Host>, kind: i32) -> HostResult {
    let h = c.data_mut();
    match kind {
        0 => h.actions.continue_request = true,
        1 => h.actions.continue_response = true,
        _ => {}
    }
    Ok(Status::Ok)
}

pub(crate) fn close_stream(c: &mut Caller<'_, Host>, _kind: i32) -> HostResult {
    c.data_mut().actions.close = true;
    Ok(Status::Ok)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn send_local_response(
    c: &mut Caller<'_, Host>,
    status: i32,
    dp: i32,
    dl: i32,
    bp: i32,
    bl: i32,
    hp: i32,
    hl: i32,
    _grpc: i32,
) -> HostResult {
    let read = (|| {
        Ok::<_, Status>((
            memory::read_str(c, dp, dl)?,
            memory::read(c, bp, bl)?,
            memory::read(c, hp, hl)?,
        ))
    })();
    let (details, body, headers) = match read {
        Ok(v) => v,
        Err(s) => return Ok(s),
    };
    let Some(headers) = deserialize(&headers) else {
        return Ok(Status::BadArgument);
    };
    c.data_mut().actions.local = Some(LocalResponse {
        status: status as u32,
        details,
        headers,
        body: body.into(),
    });
    Ok(Status::Ok)
}

pub(crate) fn get_status(
    c: &mut Caller<'_, Host>,
    code_out: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let (code, msg) = match &c.data().answer {
        Some(a) => (a.status, a.message.clone()),
        None => (0, String::new()),
    };
    if let Err(s) = memory::write_u32(c, code_out, code) {
        return Ok(s);
    }
    copy_out(c, msg.as_bytes(), ptr_out, len_out)
}

pub(crate) fn set_effective_context(c: &mut Caller<'_, Host>, ctx: i32) -> HostResult {
    let h = c.data_mut();
    let ctx = ctx as u32;
    if ctx == h.root_id || ctx == h.stream_ctx {
        h.effective = ctx;
    } else {
        tracing::debug!(filter = %h.plugin.name, ctx, "set_effective_context to a context not loaded now");
    }
    Ok(Status::Ok)
}

pub(crate) fn done(_c: &mut Caller<'_, Host>) -> HostResult {
    Ok(Status::Ok)
}
