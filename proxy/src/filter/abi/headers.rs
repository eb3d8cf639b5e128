//! Header-map host functions (`proxy_*_header_map_*`) and the ABI's
//! serialized map format.
//!
//! Runs inside a host call on the VM's thread. Maps: request/response headers
//! and trailers of the loaded stream (request headers expose `:method`,
//! `:path`, `:authority`, `:scheme`; response headers `:status`), and the
//! read-only headers/trailers of an `http_call` answer and the metadata of
//! a gRPC event (initial as headers, trailing as trailers). A map that does not
//! exist in the current phase reads as empty (single value: NOT_FOUND) and
//! ignores writes with OK, because the Rust SDK panics on any other status.

use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, StatusCode, Uri};
use wasmtime::Caller;

use super::memory::{self, copy_out, copy_out_with, HostResult};
use super::{fail_request, Status};
use crate::filter::host::{map_usage, Host, Interned, ReqHead, RespHead};
use crate::filter::metrics::Limit;

const REQUEST_HEADERS: i32 = 0;
const REQUEST_TRAILERS: i32 = 1;
const RESPONSE_HEADERS: i32 = 2;
const RESPONSE_TRAILERS: i32 = 3;
const GRPC_INITIAL_METADATA: i32 = 4;
const GRPC_TRAILING_METADATA: i32 = 5;
const CALL_RESPONSE_HEADERS: i32 = 6;
const CALL_RESPONSE_TRAILERS: i32 = 7;

/// Serializes pairs in the ABI map format.
pub(crate) fn serialize<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let pairs: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
    let count = pairs.len() as u32;
    let data_len: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data_len);
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in &pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Why a serialized map was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapError {
    Malformed,
    /// More entries than the caller allows (nothing was allocated for them).
    TooMany,
}

/// Parses the ABI map format, allowing at most `max_count` entries; the
/// count is checked before anything is allocated for the entries.
pub(crate) fn deserialize(
    bytes: &[u8],
    max_count: usize,
) -> Result<Vec<(String, Vec<u8>)>, MapError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let u32_at = |at: usize| -> Result<usize, MapError> {
        let end = at.checked_add(4).ok_or(MapError::Malformed)?;
        let b: [u8; 4] = bytes
            .get(at..end)
            .and_then(|b| b.try_into().ok())
            .ok_or(MapError::Malformed)?;
        Ok(u32::from_le_bytes(b) as usize)
    };
    let count = u32_at(0)?;
    if count > bytes.len() / 8 {
        return Err(MapError::Malformed);
    }
    if count > max_count {
        return Err(MapError::TooMany);
    }
    let mut p = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .ok_or(MapError::Malformed)?;
    let mut out = Vec::with_capacity(count);
    let mut take = |len: usize| -> Result<&[u8], MapError> {
        let end = p.checked_add(len).ok_or(MapError::Malformed)?;
        let s = bytes.get(p..end).ok_or(MapError::Malformed)?;
        p = end.checked_add(1).ok_or(MapError::Malformed)?;
        Ok(s)
    };
    for i in 0..count {
        let kl = u32_at(4 + i * 8)?;
        let vl = u32_at(8 + i * 8)?;
        let k = take(kl)?;
        let v = take(vl)?;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Ok(out)
}

/// Longest serialized map that can hold `count` entries of `bytes` bytes.
pub(crate) fn serialized_bound(count: usize, bytes: usize) -> usize {
    count
        .saturating_mul(10)
        .saturating_add(bytes)
        .saturating_add(4)
}

/// `:authority`: the URI's authority, else the Host header.
pub(crate) fn authority(req: &ReqHead) -> String {
    String::from_utf8_lossy(authority_bytes(req)).into_owned()
}

/// [`authority`], borrowed from the head.
fn authority_bytes(req: &ReqHead) -> &[u8] {
    if let Some(a) = req.uri.authority() {
        return a.as_str().as_bytes();
    }
    req.headers
        .get(HOST)
        .map(|v| v.as_bytes())
        .unwrap_or_default()
}

fn path_bytes(req: &ReqHead) -> &[u8] {
    req.uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .as_bytes()
}

/// Pseudo headers of a request head, in the order Envoy shows them,
/// borrowed from the head (nothing is built to read them).
fn req_pseudo<'a>(req: &'a ReqHead, scheme: &'static str) -> [(&'static [u8], &'a [u8]); 4] {
    [
        (b":authority", authority_bytes(req)),
        (b":path", path_bytes(req)),
        (b":method", req.method.as_str().as_bytes()),
        (b":scheme", scheme.as_bytes()),
    ]
}

fn header_pairs(h: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    h.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
}

/// Runs `f` over the pairs of `map` as the guest sees them (borrowed from
/// the host state), or `None` if the map does not exist now.
fn with_pairs<'h, R>(
    h: &'h Host,
    map: i32,
    f: impl FnOnce(&mut dyn Iterator<Item = (&'h [u8], &'h [u8])>) -> R,
) -> Option<R> {
    match map {
        CALL_RESPONSE_HEADERS
        | CALL_RESPONSE_TRAILERS
        | GRPC_INITIAL_METADATA
        | GRPC_TRAILING_METADATA => {
            let a = h.answer.as_ref()?;
            let list = if matches!(map, CALL_RESPONSE_HEADERS | GRPC_INITIAL_METADATA) {
                &a.headers
            } else {
                &a.trailers
            };
            Some(f(&mut list
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_slice()))))
        }
        _ => {
            let s = h.stream()?;
            match map {
                REQUEST_HEADERS => {
                    let req = s.req.as_ref()?;
                    let pseudo = req_pseudo(req, s.info.scheme);
                    Some(f(&mut pseudo.into_iter().chain(header_pairs(&req.headers))))
                }
                RESPONSE_HEADERS => {
                    let resp = s.resp.as_ref()?;
                    let status = resp.status.as_str().as_bytes();
                    Some(f(&mut std::iter::once((&b":status"[..], status))
                        .chain(header_pairs(&resp.headers))))
                }
                REQUEST_TRAILERS => Some(f(&mut header_pairs(s.req_trailers.as_ref()?))),
                RESPONSE_TRAILERS => Some(f(&mut header_pairs(s.resp_trailers.as_ref()?))),
                _ => None,
            }
        }
    }
}

/// Length of the ABI serialization of `pairs`.
fn serialized_len<'a>(pairs: &mut dyn Iterator<Item = (&'a [u8], &'a [u8])>) -> usize {
    pairs.fold(4usize, |n, (k, v)| {
        n.saturating_add(k.len().saturating_add(v.len()).saturating_add(10))
    })
}

/// Writes the ABI serialization of the `count` pairs of `pairs` into
/// `dst`, which must be exactly [`serialized_len`] long: the index at the
/// front and the data after it, in one pass. `None` if they do not fit.
fn serialize_into<'a>(
    pairs: &mut dyn Iterator<Item = (&'a [u8], &'a [u8])>,
    count: usize,
    dst: &mut [u8],
) -> Option<()> {
    fn put(dst: &mut [u8], at: &mut usize, bytes: &[u8]) -> Option<()> {
        let end = at.checked_add(bytes.len())?;
        dst.get_mut(*at..end)?.copy_from_slice(bytes);
        *at = end;
        Some(())
    }
    let mut index = 0;
    put(dst, &mut index, &u32::try_from(count).ok()?.to_le_bytes())?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    let mut written = 0;
    for (k, v) in pairs {
        put(dst, &mut index, &u32::try_from(k.len()).ok()?.to_le_bytes())?;
        put(dst, &mut index, &u32::try_from(v.len()).ok()?.to_le_bytes())?;
        put(dst, &mut data, k)?;
        put(dst, &mut data, &[0])?;
        put(dst, &mut data, v)?;
        put(dst, &mut data, &[0])?;
        written += 1;
    }
    (written == count && data == dst.len()).then_some(())
}

/// Value of one key (first value), borrowed from the host state, or
/// `None`. Keys match case-insensitively; nothing is serialized or copied.
fn value<'h>(h: &'h Host, map: i32, key: &[u8]) -> Option<&'h [u8]> {
    let plain = |m: &'h HeaderMap| -> Option<&'h [u8]> {
        // `HeaderMap::get` lower-cases the name itself (no allocation).
        m.get(std::str::from_utf8(key).ok()?).map(|v| v.as_bytes())
    };
    match map {
        CALL_RESPONSE_HEADERS
        | CALL_RESPONSE_TRAILERS
        | GRPC_INITIAL_METADATA
        | GRPC_TRAILING_METADATA => {
            let a = h.answer.as_ref()?;
            let list = if matches!(map, CALL_RESPONSE_HEADERS | GRPC_INITIAL_METADATA) {
                &a.headers
            } else {
                &a.trailers
            };
            list.iter()
                .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_slice())
        }
        _ => {
            let s = h.stream()?;
            match map {
                REQUEST_HEADERS => {
                    let req = s.req.as_ref()?;
                    if key.starts_with(b":") {
                        return req_pseudo(req, s.info.scheme)
                            .into_iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(key))
                            .map(|(_, v)| v);
                    }
                    plain(&req.headers)
                }
                RESPONSE_HEADERS => {
                    let resp = s.resp.as_ref()?;
                    if key.eq_ignore_ascii_case(b":status") {
                        return Some(resp.status.as_str().as_bytes());
                    }
                    if key.starts_with(b":") {
                        return None;
                    }
                    plain(&resp.headers)
                }
                REQUEST_TRAILERS => plain(s.req_trailers.as_ref()?),
                RESPONSE_TRAILERS => plain(s.resp_trailers.as_ref()?),
                _ => None,
            }
        }
    }
}

/// A mutable header map of the loaded stream.
enum MapMut<'a> {
    /// With the map's running entries and bytes (`StreamData::usage`).
    Req(&'a mut ReqHead, &'a mut Usage),
    Resp(&'a mut RespHead, &'a mut Usage),
    /// Trailers: no running total kept (rare; walked when edited).
    Plain(&'a mut HeaderMap),
}

/// Entries and bytes (names plus values) of a header map.
type Usage = (usize, usize);

/// A request or response header map whose head has already gone on (the
/// upstream or the client has it): changing it would change nothing, so
/// the guest hears BAD_ARGUMENT, as Envoy answers once a header callback
/// has continued. Reading it stays possible (Envoy refuses that too).
fn sent(h: &Host, map: i32) -> bool {
    let Some(s) = h.stream() else { return false };
    let sent = match map {
        REQUEST_HEADERS => s.heads_sent[0],
        RESPONSE_HEADERS => s.heads_sent[1],
        _ => false,
    };
    // Earlier wasp versions accepted (and dropped) such changes; a filter
    // that did not check the status (the Rust SDK traps on it) now fails,
    // so say why once per filter.
    let logged = &h.plugin.late_header_edit_logged;
    if sent
        && !logged.load(std::sync::atomic::Ordering::Relaxed)
        && !logged.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            filter = %h.plugin.name,
            map = if map == REQUEST_HEADERS { "request" } else { "response" },
            "a filter changed a header map whose head had already gone on: BAD_ARGUMENT (as Envoy); logged once per filter"
        );
    }
    sent
}

/// The map and the filter's interned names and values to write into it.
fn map_mut(h: &mut Host, map: i32) -> Option<(MapMut<'_>, &mut Interned)> {
    let (s, interned) = h.stream_and_interned()?;
    let [req_usage, resp_usage] = &mut s.usage;
    let m = match map {
        REQUEST_HEADERS => s.req.as_mut().map(|r| MapMut::Req(r, req_usage)),
        RESPONSE_HEADERS => s.resp.as_mut().map(|r| MapMut::Resp(r, resp_usage)),
        REQUEST_TRAILERS => s.req_trailers.as_mut().map(MapMut::Plain),
        RESPONSE_TRAILERS => s.resp_trailers.as_mut().map(MapMut::Plain),
        _ => None,
    }?;
    Some((m, interned))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Replace,
    Remove,
}

/// How far a filter may grow a header map.
#[derive(Clone, Copy)]
struct Caps {
    count: usize,
    bytes: usize,
}

impl Caps {
    /// The caps for `map`: the filter's limits on top of what the map held
    /// when the chain received it (so a client's 100 headers plus the
    /// core's `x-request-id` still leave a filter its full allowance).
    fn of(h: &Host, map: i32) -> Self {
        let received = h
            .stream
            .as_deref()
            .and_then(|s| match map {
                REQUEST_HEADERS => s.received.first().copied(),
                RESPONSE_HEADERS => s.received.get(1).copied(),
                _ => None,
            })
            .unwrap_or((0, 0));
        Caps {
            count: h.plugin.limits.headers.saturating_add(received.0),
            bytes: h.plugin.limits.header_bytes.saturating_add(received.1),
        }
    }
}

/// Whether going from `before` to `after` (entries, bytes) grows the map
/// past a cap. A map already past a cap (say, from the client) may still be
/// edited as long as the edit does not make it bigger.
fn grows_past(before: (usize, usize), after: (usize, usize), caps: Caps) -> Option<Limit> {
    if after.0 > caps.count && after.0 > before.0 {
        return Some(Limit::Headers);
    }
    if after.1 > caps.bytes && after.1 > before.1 {
        return Some(Limit::HeaderBytes);
    }
    None
}

fn set_pseudo_req(
    req: &mut ReqHead,
    usage: &mut Usage,
    key: &[u8],
    value: &[u8],
    caps: Caps,
    interned: &mut Interned,
) -> Result<(), Limit> {
    let is = |name: &str| key.eq_ignore_ascii_case(name.as_bytes());
    if is(":method") {
        {
            if let Ok(m) = Method::from_bytes(value) {
                req.method = m;
            }
        }
    } else if is(":path") {
        {
            if value.len() > caps.bytes {
                return Err(Limit::HeaderBytes);
            }
            if let Ok(pq) = PathAndQuery::try_from(value) {
                let mut parts = req.uri.clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(parts) {
                    req.uri = u;
                }
            }
        }
    } else if is(":authority") {
        {
            apply_plain(
                &mut req.headers,
                Some(usage),
                Op::Replace,
                b"host",
                value,
                caps,
                interned,
            )?;
            if req.uri.authority().is_some() {
                if let Ok(a) = Authority::try_from(value) {
                    let mut parts = req.uri.clone().into_parts();
                    parts.authority = Some(a);
                    if let Ok(u) = Uri::from_parts(parts) {
                        req.uri = u;
                    }
                }
            }
        }
    }
    Ok(())
}

/// One edit of `h`. `usage` is the map's running (entries, bytes), kept
/// current here; without one (trailers) the map is walked.
fn apply_plain(
    h: &mut HeaderMap,
    usage: Option<&mut Usage>,
    op: Op,
    key: &[u8],
    value: &[u8],
    caps: Caps,
    interned: &mut Interned,
) -> Result<(), Limit> {
    // `from_bytes` lower-cases the name; the filter's table reuses one it
    // keeps writing.
    let Some(name) = interned.name(key) else {
        let key = String::from_utf8_lossy(key);
        tracing::debug!(%key, "filter used an invalid header name; ignored");
        return Ok(());
    };
    // What the entries of this name hold now (replaced or removed).
    let existing = |h: &HeaderMap| {
        h.get_all(&name).iter().fold((0usize, 0usize), |(n, b), v| {
            (
                n.saturating_add(1),
                b.saturating_add(name.as_str().len().saturating_add(v.len())),
            )
        })
    };
    if op == Op::Remove {
        if let Some(u) = usage {
            let (n, b) = existing(h);
            *u = (u.0.saturating_sub(n), u.1.saturating_sub(b));
            h.remove(&name);
            debug_assert_eq!(*u, map_usage(h), "a header map's running usage drifted");
        } else {
            h.remove(&name);
        }
        return Ok(());
    }
    let Some(v) = interned.value(value) else {
        let key = name.as_str();
        tracing::debug!(key, "filter used an invalid header value; ignored");
        return Ok(());
    };
    let before = match &usage {
        Some(u) => **u,
        None => map_usage(h),
    };
    let added = name.as_str().len().saturating_add(v.len());
    let after = if op == Op::Add {
        (before.0.saturating_add(1), before.1.saturating_add(added))
    } else {
        let (n, b) = existing(h);
        (
            before.0.saturating_sub(n).saturating_add(1),
            before.1.saturating_sub(b).saturating_add(added),
        )
    };
    if let Some(limit) = grows_past(before, after, caps) {
        return Err(limit);
    }
    // The fallible calls: `append`/`insert` panic past 32768 entries.
    let r = if op == Op::Add {
        h.try_append(name, v).map(|_| ())
    } else {
        h.try_insert(name, v).map(|_| ())
    };
    r.map_err(|_| Limit::Headers)?;
    if let Some(u) = usage {
        *u = after;
        debug_assert_eq!(*u, map_usage(h), "a header map's running usage drifted");
    }
    Ok(())
}

fn apply(
    m: &mut MapMut<'_>,
    op: Op,
    key: &[u8],
    value: &[u8],
    caps: Caps,
    interned: &mut Interned,
) -> Result<(), Limit> {
    let pseudo = key.first() == Some(&b':');
    match m {
        MapMut::Req(req, usage) => {
            if pseudo {
                if op != Op::Remove {
                    set_pseudo_req(req, usage, key, value, caps, interned)?;
                }
                Ok(())
            } else {
                let usage = Some(&mut **usage);
                apply_plain(&mut req.headers, usage, op, key, value, caps, interned)
            }
        }
        MapMut::Resp(resp, usage) => {
            if key.eq_ignore_ascii_case(b":status") {
                if op != Op::Remove {
                    if let Ok(s) = StatusCode::from_bytes(value) {
                        resp.status = s;
                    }
                }
                Ok(())
            } else if !pseudo {
                let usage = Some(&mut **usage);
                apply_plain(&mut resp.headers, usage, op, key, value, caps, interned)
            } else {
                Ok(())
            }
        }
        MapMut::Plain(h) => {
            if !pseudo {
                apply_plain(h, None, op, key, value, caps, interned)
            } else {
                Ok(())
            }
        }
    }
}

impl MapMut<'_> {
    fn usage(&self) -> Usage {
        match self {
            MapMut::Req(_, u) | MapMut::Resp(_, u) => **u,
            MapMut::Plain(h) => map_usage(h),
        }
    }

    fn clear(&mut self) {
        match self {
            MapMut::Req(r, u) => {
                r.headers.clear();
                **u = (0, 0);
            }
            MapMut::Resp(r, u) => {
                r.headers.clear();
                **u = (0, 0);
            }
            MapMut::Plain(h) => h.clear(),
        }
    }
}

fn limit_detail(limit: Limit, caps: Caps) -> String {
    match limit {
        Limit::HeaderBytes => format!("a header map grown past {} bytes", caps.bytes),
        _ => format!("a header map grown past {} entries", caps.count),
    }
}

// === host functions ===

/// The map is serialized straight into the guest's allocation: the guest's
/// allocator runs between sizing and filling, and should it (perversely)
/// change the map through a host call, the guest gets zeroes, not a panic.
pub(crate) fn get_pairs(
    c: &mut Caller<'_, Host>,
    map: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let Some(len) = with_pairs(c.data(), map, serialized_len) else {
        return copy_out(c, &[], ptr_out, len_out);
    };
    copy_out_with(c, len, ptr_out, len_out, |h, dst| {
        let count = with_pairs(h, map, |p| p.count()).unwrap_or(0);
        if with_pairs(h, map, |p| serialize_into(p, count, dst)).flatten() != Some(()) {
            dst.fill(0);
        }
    })
}

pub(crate) fn get_size(c: &mut Caller<'_, Host>, map: i32, size_out: i32) -> HostResult {
    let n = with_pairs(c.data(), map, serialized_len).unwrap_or(0);
    Ok(match memory::write_u32(c, size_out, n as u32) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn set_pairs(c: &mut Caller<'_, Host>, map: i32, ptr: i32, len: i32) -> HostResult {
    if sent(c.data(), map) {
        return Ok(Status::BadArgument);
    }
    let caps = Caps::of(c.data(), map);
    // The map may be replaced by one as big as the caps, or as the map it
    // replaces (a filter may write back what it read).
    let current = map_mut(c.data_mut(), map).map(|(m, _)| m.usage());
    let (cur_count, cur_bytes) = current.unwrap_or((0, 0));
    let max_count = caps.count.max(cur_count).saturating_add(4);
    let max_len = serialized_bound(max_count, caps.bytes.max(cur_bytes).saturating_add(4 << 10));
    let bytes = match memory::read_at_most(c, ptr, len, max_len) {
        Ok(Some(b)) => b,
        Ok(None) => {
            let detail = format!("a serialized header map of {} bytes", len as u32);
            return Err(fail_request(c, Limit::HeaderBytes, &detail));
        }
        Err(s) => return Ok(s),
    };
    let pairs = match deserialize(&bytes, max_count) {
        Ok(p) => p,
        Err(MapError::Malformed) => return Ok(Status::BadArgument),
        Err(MapError::TooMany) => {
            let detail = format!("a header map of more than {max_count} entries");
            return Err(fail_request(c, Limit::Headers, &detail));
        }
    };
    let Some((mut m, interned)) = map_mut(c.data_mut(), map) else {
        return Ok(Status::Ok);
    };
    let plain = pairs.iter().filter(|(k, _)| !k.starts_with(':'));
    let after = plain.fold((0usize, 0usize), |(n, b), (k, v)| {
        (n + 1, b.saturating_add(k.len() + v.len()))
    });
    let mut result = match grows_past((cur_count, cur_bytes), after, caps) {
        Some(limit) => Err(limit),
        None => Ok(()),
    };
    if result.is_ok() {
        // The whole map was checked above; the entries are bounded by
        // `max_count` and the bytes by the read.
        let unbounded = Caps {
            count: usize::MAX,
            bytes: usize::MAX,
        };
        m.clear();
        for (k, v) in &pairs {
            let op = if k.starts_with(':') {
                Op::Replace
            } else {
                Op::Add
            };
            if let Err(limit) = apply(&mut m, op, k.as_bytes(), v, unbounded, interned) {
                result = Err(limit);
                break;
            }
        }
    }
    match result {
        Ok(()) => Ok(Status::Ok),
        Err(limit) => Err(fail_request(c, limit, &limit_detail(limit, caps))),
    }
}

pub(crate) fn get_value(
    c: &mut Caller<'_, Host>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let max = c.data().plugin.limits.header_bytes.max(64 << 10);
    // The key is copied (the guest's allocator may move its memory), on
    // the stack for the usual short names.
    let mut stack = [0u8; 128];
    let heap;
    let key: &[u8] = if key_len as u32 as usize <= stack.len() {
        let Some(k) = stack.get_mut(..key_len as u32 as usize) else {
            return Ok(Status::NotFound);
        };
        match memory::slice_mut(c, key_ptr, key_len) {
            Ok(src) => k.copy_from_slice(src),
            Err(s) => return Ok(s),
        }
        k
    } else {
        heap = match memory::read_at_most(c, key_ptr, key_len, max) {
            Ok(Some(k)) => k,
            Ok(None) => return Ok(Status::NotFound),
            Err(s) => return Ok(s),
        };
        &heap
    };
    let Some(len) = value(c.data(), map, key).map(<[u8]>::len) else {
        return Ok(Status::NotFound);
    };
    copy_out_with(c, len, ptr_out, len_out, |h, dst| {
        match value(h, map, key) {
            Some(v) if v.len() == dst.len() => dst.copy_from_slice(v),
            _ => dst.fill(0),
        }
    })
}

fn edit(
    c: &mut Caller<'_, Host>,
    op: Op,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    if sent(c.data(), map) {
        return Ok(Status::BadArgument);
    }
    let caps = Caps::of(c.data(), map);
    let Some(mem) = c.data().memory else {
        return Ok(Status::InternalFailure);
    };
    // Key and value are read in place: the guest's memory and the host
    // state are borrowed side by side, and only the header map keeps a copy.
    let outcome = {
        let (data, host) = mem.data_and_store_mut(&mut *c);
        let range = |p: i32, l: i32| {
            let start = p as u32 as usize;
            start
                .checked_add(l as u32 as usize)
                .and_then(|end| data.get(start..end))
        };
        let Some(key) = range(kp, kl) else {
            return Ok(Status::InvalidMemoryAccess);
        };
        if key.len() > caps.bytes {
            // No header has so long a name: nothing to remove, too much to add.
            if op == Op::Remove {
                return Ok(Status::Ok);
            }
            Err(Limit::HeaderBytes)
        } else {
            let value: &[u8] = if op == Op::Remove {
                &[]
            } else {
                match range(vp, vl) {
                    Some(v) => v,
                    None => return Ok(Status::InvalidMemoryAccess),
                }
            };
            if value.len() > caps.bytes {
                Err(Limit::HeaderBytes)
            } else {
                match map_mut(host, map) {
                    Some((mut m, interned)) => apply(&mut m, op, key, value, caps, interned),
                    None => Ok(()),
                }
            }
        }
    };
    match outcome {
        Ok(()) => Ok(Status::Ok),
        Err(limit) => Err(fail_request(c, limit, &limit_detail(limit, caps))),
    }
}

pub(crate) fn add(
    c: &mut Caller<'_, Host>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    edit(c, Op::Add, map, kp, kl, vp, vl)
}

pub(crate) fn replace(
    c: &mut Caller<'_, Host>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    edit(c, Op::Replace, map, kp, kl, vp, vl)
}

pub(crate) fn remove(c: &mut Caller<'_, Host>, map: i32, kp: i32, kl: i32) -> HostResult {
    edit(c, Op::Remove, map, kp, kl, 0, 0)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn map_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b":path", b"/x"), (b"empty", b"")];
        let bytes = serialize(pairs.iter().copied());
        let back = deserialize(&bytes, 3).unwrap();
        assert_eq!(deserialize(&bytes, 2), Err(MapError::TooMany));
        assert_eq!(back.len(), 3);
        assert_eq!(back[1].0, ":path");
        assert_eq!(back[1].1, b"/x");
        assert_eq!(back[2].1, b"");
    }

    #[test]
    fn serialized_in_place_matches_serialize() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":status", b"200"), (b"x", b""), (b"k", b"vv")];
        let want = serialize(pairs.iter().copied());
        assert_eq!(serialized_len(&mut pairs.iter().copied()), want.len());
        let mut dst = vec![0xffu8; want.len()];
        assert_eq!(
            serialize_into(&mut pairs.iter().copied(), pairs.len(), &mut dst),
            Some(())
        );
        assert_eq!(dst, want);
        // A map that changed size between sizing and filling is refused.
        let mut short = vec![0u8; want.len() - 1];
        assert_eq!(
            serialize_into(&mut pairs.iter().copied(), pairs.len(), &mut short),
            None
        );
    }

    #[test]
    fn header_map_get_ignores_case() {
        let mut h = HeaderMap::new();
        h.insert("x-seen", http::HeaderValue::from_static("1"));
        assert_eq!(h.get("X-Seen").map(|v| v.as_bytes()), Some(&b"1"[..]));
    }

    /// The running (entries, bytes) kept per edit must equal a walk of the
    /// map after every kind of edit: a drift would let a filter past
    /// `limits.headers`/`header_bytes` or refuse it too early. Checked here
    /// directly, since the debug assertion inside a host call only fails
    /// the request it runs in.
    #[test]
    fn running_header_totals_follow_every_edit_and_hold_at_the_caps() {
        let mut h = HeaderMap::new();
        h.append("a", http::HeaderValue::from_static("1"));
        h.append("a", http::HeaderValue::from_static("22"));
        h.append("b", http::HeaderValue::from_static("333"));
        let mut usage = map_usage(&h);
        let mut interned = Interned::default();
        let roomy = Caps {
            count: 100,
            bytes: 10_000,
        };
        let steps: [(Op, &[u8], &[u8]); 8] = [
            (Op::Add, b"c", b"4444"),
            (Op::Add, b"A", b"x"),
            (Op::Replace, b"a", b"only"),
            (Op::Remove, b"b", b""),
            (Op::Remove, b"missing", b""),
            (Op::Replace, b"new", b"v"),
            (Op::Add, b"bad name", b"v"),
            (Op::Add, b"d", b"bad\nvalue"),
        ];
        for (op, k, v) in steps {
            assert_eq!(
                apply_plain(&mut h, Some(&mut usage), op, k, v, roomy, &mut interned),
                Ok(())
            );
            assert_eq!(
                usage,
                map_usage(&h),
                "after {:?}",
                String::from_utf8_lossy(k)
            );
        }
        // At the entry cap: removing k entries makes room for exactly k.
        let at = usage;
        let tight = Caps {
            count: at.0,
            bytes: 10_000,
        };
        let edit = |h: &mut HeaderMap, u: &mut Usage, i: &mut Interned, op, k: &[u8]| {
            apply_plain(h, Some(u), op, k, b"z", tight, i)
        };
        assert_eq!(
            edit(&mut h, &mut usage, &mut interned, Op::Add, b"e"),
            Err(Limit::Headers)
        );
        assert_eq!(usage, map_usage(&h), "a refused add changes nothing");
        assert_eq!(
            edit(&mut h, &mut usage, &mut interned, Op::Remove, b"c"),
            Ok(())
        );
        assert_eq!(
            edit(&mut h, &mut usage, &mut interned, Op::Add, b"e"),
            Ok(())
        );
        assert_eq!(
            edit(&mut h, &mut usage, &mut interned, Op::Add, b"f"),
            Err(Limit::Headers)
        );
        assert_eq!(usage, map_usage(&h));
        // At the byte cap: a replace that grows the map past it is refused,
        // one that shrinks it is not.
        let bytes = Caps {
            count: 100,
            bytes: usage.1,
        };
        assert_eq!(
            apply_plain(
                &mut h,
                Some(&mut usage),
                Op::Replace,
                b"a",
                b"longer",
                bytes,
                &mut interned
            ),
            Err(Limit::HeaderBytes)
        );
        assert_eq!(
            apply_plain(
                &mut h,
                Some(&mut usage),
                Op::Replace,
                b"a",
                b"",
                bytes,
                &mut interned
            ),
            Ok(())
        );
        assert_eq!(usage, map_usage(&h));
    }

    #[test]
    fn malformed_maps_are_rejected() {
        assert_eq!(deserialize(&[5, 0, 0, 0, 1], 9), Err(MapError::Malformed));
        let bad = [1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(deserialize(&bad, 9), Err(MapError::Malformed));
        let huge = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(deserialize(&huge, 9), Err(MapError::Malformed));
        assert_eq!(deserialize(&[], 0).unwrap().len(), 0);
    }
}
