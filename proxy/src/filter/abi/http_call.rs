//! `proxy_http_call`: turns the guest's request into an `http::Request`,
//! asks the core's [`HttpCallouts`](crate::filter::HttpCallouts) for a
//! future, and records it with a fresh token. The caller of the callback
//! spawns the future after the callback returns; its answer comes back as
//! `proxy_on_http_call_response` (see `stream` and `worker`).
//!
//! Runs inside a host call on the VM's thread; never awaits. An unknown
//! cluster or a request without `:method`, `:path` or `:authority` answers
//! BAD_ARGUMENT (a status the Rust SDK accepts).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{Method, Request};
use wasmtime::Caller;

use super::headers::{deserialize, serialized_bound, MapError};
use super::memory::{self, HostResult};
use super::{note_limit, Status};
use crate::filter::host::{Host, NewCallout};
use crate::filter::metrics::Limit;
use crate::filter::CalloutFuture;

/// Default timeout when the guest passes 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest cluster name read from the guest.
const MAX_CLUSTER_NAME: usize = 1024;

/// One of a filter's `limits.callouts` slots, held by the callout's future
/// until it ends or is dropped. The count is one atomic per filter (all
/// workers, and the builder threads that run start-up callbacks), so a
/// slot taken on one thread and given back on another balances.
struct InFlight {
    count: Arc<AtomicUsize>,
}

impl InFlight {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight {
            count: count.clone(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn call(
    c: &mut Caller<'_, Host>,
    up: i32,
    ul: i32,
    hp: i32,
    hl: i32,
    bp: i32,
    bl: i32,
    tp: i32,
    tl: i32,
    timeout_ms: i32,
    token_out: i32,
) -> HostResult {
    let limits = c.data().plugin.limits.clone();
    let max_body = usize::try_from(c.data().plugin.max_body_bytes).unwrap_or(usize::MAX);
    let max_map = serialized_bound(limits.headers, limits.header_bytes);
    let read = (|| {
        memory::check(c, tp, tl)?;
        Ok::<_, Status>((
            memory::read_at_most(c, up, ul, MAX_CLUSTER_NAME)?,
            memory::read_at_most(c, hp, hl, max_map)?,
            memory::read_at_most(c, bp, bl, max_body)?,
        ))
    })();
    let (cluster, headers, body) = match read {
        Ok(v) => v,
        Err(s) => return Ok(s),
    };
    let Some(cluster) = cluster.map(|c| String::from_utf8_lossy(&c).into_owned()) else {
        return Ok(Status::BadArgument);
    };
    let Some(body) = body else {
        let detail = format!(
            "an http_call body of {} bytes (max_body_bytes {max_body})",
            bl as u32
        );
        note_limit(c, Limit::BodyBytes, &detail);
        return Ok(Status::BadArgument);
    };
    let headers = match headers.map(|h| deserialize(&h, limits.headers)) {
        Some(Ok(h)) => h,
        Some(Err(MapError::Malformed)) => return Ok(Status::BadArgument),
        None | Some(Err(MapError::TooMany)) => {
            let detail = format!(
                "http_call headers over {} entries or {} bytes",
                limits.headers, limits.header_bytes
            );
            note_limit(c, Limit::Headers, &detail);
            return Ok(Status::BadArgument);
        }
    };
    // `:method`, `:path` and `:authority` are required (as in the spec and Envoy).
    let mut method = None;
    let mut path = None;
    let mut authority = false;
    let mut builder = Request::builder();
    for (k, v) in &headers {
        match k.as_str() {
            ":method" => match Method::from_bytes(v) {
                Ok(m) => method = Some(m),
                Err(_) => return Ok(Status::BadArgument),
            },
            ":path" => path = Some(String::from_utf8_lossy(v).into_owned()),
            ":authority" => match HeaderValue::from_bytes(v) {
                Ok(v) => {
                    authority = true;
                    builder = builder.header(HOST, v);
                }
                Err(_) => return Ok(Status::BadArgument),
            },
            k if k.starts_with(':') => {}
            k => match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                (Ok(n), Ok(v)) => builder = builder.header(n, v),
                _ => return Ok(Status::BadArgument),
            },
        }
    }
    let (Some(method), Some(path), true) = (method, path, authority) else {
        return Ok(Status::BadArgument);
    };
    let req = match builder.method(method).uri(path).body(Bytes::from(body)) {
        Ok(r) => r,
        Err(_) => return Ok(Status::BadArgument),
    };
    let timeout = match timeout_ms as u32 {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let plugin = c.data().plugin.clone();
    let Some(slot) = InFlight::take(&plugin.callouts_in_flight, limits.callouts) else {
        let detail = format!(
            "more than {} http_calls of this filter in flight",
            limits.callouts
        );
        note_limit(c, Limit::Callouts, &detail);
        return Ok(Status::InternalFailure);
    };
    let Some(future) = plugin.callouts.call(&cluster, req, timeout) else {
        tracing::debug!(filter = %plugin.name, cluster, "http_call to an unknown cluster");
        return Ok(Status::BadArgument);
    };
    // The slot is given back when the callout ends or is dropped.
    let future: CalloutFuture = Box::pin(async move {
        let _slot = slot;
        future.await
    });
    let h = c.data_mut();
    let token = h.next_token;
    h.next_token = h.next_token.wrapping_add(1).max(1);
    let context = h.effective;
    h.callouts.push(NewCallout {
        token,
        context,
        timeout,
        future,
    });
    Ok(match memory::write_u32(c, token_out, token) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}
