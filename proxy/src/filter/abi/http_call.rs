//! `proxy_http_call`: turns the guest's request into an `http::Request`,
//! asks the core's [`HttpCallouts`](crate::filter::HttpCallouts) for a
//! future, and records it with a fresh token. The caller of the callback
//! spawns the future after the callback returns; its answer comes back as
//! `proxy_on_http_call_response` (see `stream` and `worker`).
//!
//! Runs inside a host call on the VM's thread; never awaits. An unknown
//! cluster or a request without `:method`, `:path` or `:authority` answers
//! BAD_ARGUMENT (a status the Rust SDK accepts).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{Method, Request};
use wasmtime::Caller;

use super::headers::deserialize;
use super::memory::{self, HostResult};
use super::Status;
use crate::filter::host::{Host, NewCallout};

/// Default timeout when the guest passes 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

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
    let read = |c: &mut Caller<'_, Host>, p, l| memory::read(c, p, l);
    let (cluster, headers, body, _trailers) = match (|| {
        Ok::<_, Status>((
            memory::read_str(c, up, ul)?,
            read(c, hp, hl)?,
            read(c, bp, bl)?,
            read(c, tp, tl)?,
        ))
    })() {
        Ok(v) => v,
        Err(s) => return Ok(s),
    };
    let Some(headers) = deserialize(&headers) else {
        return Ok(Status::BadArgument);
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
    let callouts = c.data().plugin.callouts.clone();
    let Some(future) = callouts.call(&cluster, req, timeout) else {
        tracing::debug!(filter = %c.data().plugin.name, cluster, "http_call to an unknown cluster");
        return Ok(Status::BadArgument);
    };
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
