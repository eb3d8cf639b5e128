//! Metric host functions (`proxy_define_metric`, `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric`) over the filter's
//! process-wide [`MetricStore`](crate::filter::metrics::MetricStore).
//!
//! Runs inside a host call on the VM's thread. Each VM caches the metrics it
//! uses by id, so increments are one relaxed atomic add.

use std::sync::Arc;

use wasmtime::Caller;

use super::memory::{self, HostResult};
use super::Status;
use crate::filter::host::Host;
use crate::filter::metrics::{GuestMetric, MetricKind};

fn lookup(h: &mut Host, id: u32) -> Option<Arc<GuestMetric>> {
    if let Some(m) = h.metrics.get(&id) {
        return Some(m.clone());
    }
    let m = h.plugin.metrics.get(id)?;
    h.metrics.insert(id, m.clone());
    Some(m)
}

pub(crate) fn define(
    c: &mut Caller<'_, Host>,
    kind: i32,
    np: i32,
    nl: i32,
    id_out: i32,
) -> HostResult {
    let name = match memory::read_str(c, np, nl) {
        Ok(n) => n,
        Err(s) => return Ok(s),
    };
    let Some(kind) = MetricKind::from_abi(kind) else {
        return Ok(Status::BadArgument);
    };
    let Some((id, m)) = c.data().plugin.metrics.define(kind, &name) else {
        tracing::warn!(filter = %c.data().plugin.name, metric = name, "metric redefined with another type");
        return Ok(Status::BadArgument);
    };
    c.data_mut().metrics.insert(id, m);
    Ok(match memory::write_u32(c, id_out, id) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn increment(c: &mut Caller<'_, Host>, id: i32, by: i64) -> HostResult {
    let Some(m) = lookup(c.data_mut(), id as u32) else {
        return Ok(Status::NotFound);
    };
    Ok(if m.increment(by) {
        Status::Ok
    } else {
        Status::BadArgument
    })
}

pub(crate) fn record(c: &mut Caller<'_, Host>, id: i32, value: i64) -> HostResult {
    let Some(m) = lookup(c.data_mut(), id as u32) else {
        return Ok(Status::NotFound);
    };
    m.record(value as u64);
    Ok(Status::Ok)
}

pub(crate) fn get(c: &mut Caller<'_, Host>, id: i32, out: i32) -> HostResult {
    let Some(m) = lookup(c.data_mut(), id as u32) else {
        return Ok(Status::NotFound);
    };
    Ok(match memory::write_u64(c, out, m.get()) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}
