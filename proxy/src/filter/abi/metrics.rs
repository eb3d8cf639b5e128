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
use crate::filter::metrics::{
    Defined, GuestMetric, Limit, MetricKind, MetricStore, MAX_METRIC_NAME_BYTES,
};

fn lookup(h: &mut Host, id: u32) -> Option<Arc<GuestMetric>> {
    if let Some(m) = h.metrics.get(&id) {
        return Some(m.clone());
    }
    let m = h.plugin.metrics.get(id)?;
    h.metrics.insert(id, m.clone());
    Some(m)
}

/// `proxy_define_metric`. The Rust SDK accepts only OK here, so a metric
/// that is not kept (over `limits.metrics`, a reserved or over-long name, a
/// kind clash) gets a discard id: updates to it answer OK and go nowhere.
pub(crate) fn define(
    c: &mut Caller<'_, Host>,
    kind: i32,
    np: i32,
    nl: i32,
    id_out: i32,
) -> HostResult {
    let Some(kind) = MetricKind::from_abi(kind) else {
        return Ok(Status::BadArgument);
    };
    // An over-long name is refused before it is copied.
    let name = if (nl as u32 as usize) > MAX_METRIC_NAME_BYTES {
        if let Err(s) = memory::check(c, np, nl) {
            return Ok(s);
        }
        None
    } else {
        match memory::read_str(c, np, nl) {
            Ok(n) => Some(n),
            Err(s) => return Ok(s),
        }
    };
    let plugin = c.data().plugin.clone();
    let defined = match &name {
        Some(n) => plugin.metrics.define(kind, n, plugin.limits.metrics),
        None => Defined::Reserved,
    };
    let shown = name.as_deref().unwrap_or("(over-long name)");
    let id = match defined {
        Defined::Metric(id, m) => {
            c.data_mut().metrics.insert(id, m);
            id
        }
        Defined::KindClash => {
            tracing::warn!(filter = %plugin.name, metric = shown, "metric redefined with another type; updates to it are dropped");
            MetricStore::discard_id(kind)
        }
        Defined::Full => {
            let detail = format!(
                "defining metric \"{shown}\" past {} metrics; updates to it are dropped",
                plugin.limits.metrics
            );
            plugin
                .stats
                .limit_exceeded(&plugin.name, Limit::Metrics, &detail);
            MetricStore::discard_id(kind)
        }
        Defined::Reserved => {
            let detail = format!(
                "metric name \"{shown}\" is reserved (wasp_*, process_*) or longer than {MAX_METRIC_NAME_BYTES} bytes; it is not exported"
            );
            plugin
                .stats
                .limit_exceeded(&plugin.name, Limit::MetricName, &detail);
            MetricStore::discard_id(kind)
        }
    };
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
