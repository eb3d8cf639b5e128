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
use crate::filter::host::{CalloutWork, Host, NewCallout};
use crate::filter::metrics::Limit;
use crate::filter::CalloutFuture;

/// Default timeout when the guest passes 0.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest cluster name read from the guest.
pub(crate) const MAX_CLUSTER_NAME: usize = 1024;

/// Request-body bytes of a filter's callouts in flight, all workers: a
/// filter re-sending one big buffer to a slow cluster cannot pin
/// `callouts` x `max_body_bytes` of memory.
pub(crate) const CALLOUT_BYTES_IN_FLIGHT: usize = 64 << 20;

/// `n` units of a filter's callout budget (one of its `limits.callouts`
/// slots, or body bytes), held by the callout's future until it ends or is
/// dropped. Each budget is one atomic per filter (all workers, and the
/// builder threads that run start-up callbacks), so units taken on one
/// thread and given back on another balance.
pub(crate) struct InFlight {
    budget: Arc<AtomicUsize>,
    n: usize,
}

impl InFlight {
    /// `n` more units if the budget stays at most `max`.
    pub(crate) fn take(budget: &Arc<AtomicUsize>, n: usize, max: usize) -> Option<Self> {
        budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| {
                have.checked_add(n).filter(|t| *t <= max)
            })
            .ok()?;
        Some(InFlight {
            budget: budget.clone(),
            n,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.n;
        let _ = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| {
                Some(have.saturating_sub(n))
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
    let Some(slot) = InFlight::take(&plugin.callouts_in_flight, 1, limits.callouts) else {
        let detail = format!(
            "more than {} http_calls of this filter in flight",
            limits.callouts
        );
        note_limit(c, Limit::Callouts, &detail);
        return Ok(Status::InternalFailure);
    };
    let Some(bytes_slot) = InFlight::take(
        &plugin.callout_bytes_in_flight,
        req.body().len(),
        CALLOUT_BYTES_IN_FLIGHT,
    ) else {
        let detail = format!(
            "more than {} MiB of http_call bodies of this filter in flight",
            CALLOUT_BYTES_IN_FLIGHT >> 20
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
        let _slots = (slot, bytes_slot);
        future.await
    });
    let h = c.data_mut();
    let token = h.next_token;
    h.next_token = h.next_token.wrapping_add(1).max(1);
    let context = h.effective;
    let root = h.effective_root();
    h.callouts.push(NewCallout {
        token,
        context,
        root,
        timeout,
        work: CalloutWork::Http(future),
    });
    Ok(match memory::write_u32(c, token_out, token) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

#[cfg(test)]
mod in_flight {
    use super::*;

    #[test]
    fn callout_slots_and_bytes_are_given_back_on_any_thread() {
        let count = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let a = InFlight::take(&count, 1, 2);
        let b = InFlight::take(&count, 1, 2);
        assert!(a.is_some() && b.is_some());
        assert!(
            InFlight::take(&count, 1, 2).is_none(),
            "third over a cap of 2"
        );
        // Taken here, given back on another thread (a builder thread's
        // start-up callout ends on the worker).
        std::thread::spawn(move || drop((a, b)))
            .join()
            .unwrap_or_else(|_| panic!("dropping slots panicked"));
        assert_eq!(count.load(Ordering::Acquire), 0);

        let big = InFlight::take(
            &bytes,
            CALLOUT_BYTES_IN_FLIGHT - 10,
            CALLOUT_BYTES_IN_FLIGHT,
        );
        assert!(big.is_some());
        assert!(
            InFlight::take(&bytes, 11, CALLOUT_BYTES_IN_FLIGHT).is_none(),
            "past the byte budget"
        );
        let small = InFlight::take(&bytes, 10, CALLOUT_BYTES_IN_FLIGHT);
        assert!(small.is_some());
        drop((big, small));
        assert_eq!(bytes.load(Ordering::Acquire), 0);
        assert!(
            InFlight::take(&bytes, usize::MAX, CALLOUT_BYTES_IN_FLIGHT).is_none(),
            "no overflow"
        );
    }
}
