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

use super::headers::{deserialize, serialized_bound, MapError};
use super::memory::{self, copy_out, HostResult};
use super::{fail_request, note_limit, Status};
use crate::filter::host::{Host, LocalResponse};
use crate::filter::metrics::Limit;
use crate::filter::HostLimits;

/// Charges one log line of `len` bytes to the running callback's budget
/// (`limits.log_bytes`); false (and counted) if it does not fit.
pub(crate) fn charge_log(c: &mut Caller<'_, Host>, len: usize) -> bool {
    let cost = len.saturating_add(HostLimits::LOG_LINE_OVERHEAD);
    let h = c.data_mut();
    let budget = h.plugin.limits.log_bytes;
    let used = h.actions.log_bytes;
    if used.saturating_add(cost) > budget {
        let crossing = used <= budget;
        // Past the budget: later lines of this callback are dropped too.
        h.actions.log_bytes = budget.saturating_add(1);
        if crossing {
            let detail = format!("log lines past {budget} bytes in one callback were dropped");
            note_limit(c, Limit::LogBytes, &detail);
        }
        return false;
    }
    h.actions.log_bytes = used.saturating_add(cost);
    true
}

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
    if !enabled || !charge_log(c, len as u32 as usize) {
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

/// What `proxy_get_log_level` answers instead of the subscriber's level
/// (0 trace .. 4 error); `u8::MAX`: no override (the proxy never sets one).
pub(crate) static REPORTED_LOG_LEVEL: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(u8::MAX);

pub(crate) fn get_log_level(c: &mut Caller<'_, Host>, out: i32) -> HostResult {
    use tracing::level_filters::LevelFilter;
    let reported = REPORTED_LOG_LEVEL.load(std::sync::atomic::Ordering::Relaxed);
    let level = match LevelFilter::current() {
        _ if reported != u8::MAX => u32::from(reported),
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
    let h = c.data_mut();
    // One period per VM, and ticks reach root 1 only: a per-route root
    // (a route's filters.NAME.config) must not change the filter's own.
    if h.effective != h.root_id && h.is_root(h.effective) {
        tracing::debug!(
            filter = %h.plugin.name,
            "set_tick_period from a per-route root context ignored"
        );
        return Ok(Status::Ok);
    }
    h.tick_period_ms = ms as u32;
    Ok(Status::Ok)
}

pub(crate) fn continue_stream(c: &mut Caller<'_, Host>, kind: i32) -> HostResult {
    let h = c.data_mut();
    // Downstream (2) and upstream (3) data of a network filter travel the
    // request and response sides of the same machinery.
    match kind {
        0 | 2 => h.actions.continue_request = true,
        1 | 3 => h.actions.continue_response = true,
        _ => {}
    }
    Ok(Status::Ok)
}

pub(crate) fn close_stream(c: &mut Caller<'_, Host>, _kind: i32) -> HostResult {
    c.data_mut().actions.close = true;
    Ok(Status::Ok)
}

/// Headers a filter may not set on a local response: framing and
/// hop-by-hop headers. hyper computes the framing from the body it is
/// given; a filter's `content-length: 0` over a real body would otherwise
/// make the client read the rest as another response.
const LOCAL_RESPONSE_DROPPED: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "te",
    "trailer",
];

/// Longest `details` string of a local response that is kept (it is only logged).
const MAX_DETAILS_BYTES: usize = 1024;

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
    let limits = c.data().plugin.limits.clone();
    let max_body = usize::try_from(c.data().plugin.max_body_bytes).unwrap_or(usize::MAX);
    let max_map = serialized_bound(limits.headers, limits.header_bytes);
    let read = (|| {
        Ok::<_, Status>((
            memory::read_at_most(c, dp, dl, MAX_DETAILS_BYTES)?,
            memory::read_at_most(c, bp, bl, max_body)?,
            memory::read_at_most(c, hp, hl, max_map)?,
        ))
    })();
    let (details, body, headers) = match read {
        Ok(v) => v,
        Err(s) => return Ok(s),
    };
    let Some(body) = body else {
        let detail = format!(
            "a local response body of {} bytes (max_body_bytes {max_body})",
            bl as u32
        );
        return Err(fail_request(c, Limit::BodyBytes, &detail));
    };
    let Some(headers) = headers else {
        let detail = format!("local response headers of {} serialized bytes", hl as u32);
        return Err(fail_request(c, Limit::HeaderBytes, &detail));
    };
    let headers = match deserialize(&headers, limits.headers) {
        Ok(h) => h,
        Err(MapError::Malformed) => return Ok(Status::BadArgument),
        Err(MapError::TooMany) => {
            let detail = format!("a local response with more than {} headers", limits.headers);
            return Err(fail_request(c, Limit::Headers, &detail));
        }
    };
    let bytes = headers
        .iter()
        .fold(0usize, |n, (k, v)| n.saturating_add(k.len() + v.len()));
    if bytes > limits.header_bytes {
        let detail = format!("local response headers of {bytes} bytes");
        return Err(fail_request(c, Limit::HeaderBytes, &detail));
    }
    let headers = headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| {
            let keep = !k.starts_with(':') && !LOCAL_RESPONSE_DROPPED.contains(&k.as_str());
            if !keep {
                tracing::debug!(
                    header = k,
                    "dropped a framing or hop-by-hop header from a filter's local response"
                );
            }
            keep
        })
        .collect();
    let details = details
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default();
    c.data_mut().actions.local = Some(Box::new(LocalResponse {
        status: status as u32,
        details,
        headers,
        body: body.into(),
    }));
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
    if h.is_root(ctx) || ctx == h.stream_ctx {
        h.effective = ctx;
    } else {
        tracing::debug!(filter = %h.plugin.name, ctx, "set_effective_context to a context not loaded now");
    }
    Ok(Status::Ok)
}

pub(crate) fn done(_c: &mut Caller<'_, Host>) -> HostResult {
    Ok(Status::Ok)
}
