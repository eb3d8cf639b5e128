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

use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, StatusCode, Uri};
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::{fail_request, Status};
use crate::filter::host::{map_usage, Host, ReqHead, RespHead};
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

/// Pseudo headers of a request head, in the order Envoy shows them.
fn req_pseudo(req: &ReqHead, scheme: &str) -> [(&'static str, Vec<u8>); 4] {
    let path = req
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .as_bytes()
        .to_vec();
    [
        (":authority", authority(req).into_bytes()),
        (":path", path),
        (":method", req.method.as_str().as_bytes().to_vec()),
        (":scheme", scheme.as_bytes().to_vec()),
    ]
}

/// `:authority`: the URI's authority, else the Host header.
pub(crate) fn authority(req: &ReqHead) -> String {
    if let Some(a) = req.uri.authority() {
        return a.as_str().to_string();
    }
    req.headers
        .get(HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

fn header_pairs(h: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    h.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
}

/// Serialized view of a map, or `None` if the map does not exist now.
fn serialized(h: &Host, map: i32) -> Option<Vec<u8>> {
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
            Some(serialize(
                list.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())),
            ))
        }
        _ => {
            let s = h.stream()?;
            match map {
                REQUEST_HEADERS => {
                    let req = s.req.as_ref()?;
                    let pseudo = req_pseudo(req, s.info.scheme);
                    let it = pseudo
                        .iter()
                        .map(|(k, v)| (k.as_bytes(), v.as_slice()))
                        .chain(header_pairs(&req.headers));
                    Some(serialize(it))
                }
                RESPONSE_HEADERS => {
                    let resp = s.resp.as_ref()?;
                    let status = resp.status.as_str().as_bytes().to_vec();
                    let it = std::iter::once((&b":status"[..], status.as_slice()))
                        .chain(header_pairs(&resp.headers));
                    Some(serialize(it))
                }
                REQUEST_TRAILERS => Some(serialize(header_pairs(s.req_trailers.as_ref()?))),
                RESPONSE_TRAILERS => Some(serialize(header_pairs(s.resp_trailers.as_ref()?))),
                _ => None,
            }
        }
    }
}

/// Value of one key (first value), or `None`.
fn value(h: &Host, map: i32, key: &str) -> Option<Vec<u8>> {
    let key = key.to_ascii_lowercase();
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
                .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                .map(|(_, v)| v.clone())
        }
        _ => {
            let s = h.stream()?;
            match map {
                REQUEST_HEADERS => {
                    let req = s.req.as_ref()?;
                    if key.starts_with(':') {
                        return req_pseudo(req, s.info.scheme)
                            .into_iter()
                            .find(|(k, _)| *k == key)
                            .map(|(_, v)| v);
                    }
                    req.headers.get(key.as_str()).map(|v| v.as_bytes().to_vec())
                }
                RESPONSE_HEADERS => {
                    let resp = s.resp.as_ref()?;
                    if key == ":status" {
                        return Some(resp.status.as_str().as_bytes().to_vec());
                    }
                    resp.headers
                        .get(key.as_str())
                        .map(|v| v.as_bytes().to_vec())
                }
                REQUEST_TRAILERS => s
                    .req_trailers
                    .as_ref()?
                    .get(key.as_str())
                    .map(|v| v.as_bytes().to_vec()),
                RESPONSE_TRAILERS => s
                    .resp_trailers
                    .as_ref()?
                    .get(key.as_str())
                    .map(|v| v.as_bytes().to_vec()),
                _ => None,
            }
        }
    }
}

/// A mutable header map of the loaded stream.
enum MapMut<'a> {
    Req(&'a mut ReqHead),
    Resp(&'a mut RespHead),
    Plain(&'a mut HeaderMap),
}

fn map_mut(h: &mut Host, map: i32) -> Option<MapMut<'_>> {
    let s = h.stream_mut()?;
    match map {
        REQUEST_HEADERS => s.req.as_mut().map(MapMut::Req),
        RESPONSE_HEADERS => s.resp.as_mut().map(MapMut::Resp),
        REQUEST_TRAILERS => s.req_trailers.as_mut().map(MapMut::Plain),
        RESPONSE_TRAILERS => s.resp_trailers.as_mut().map(MapMut::Plain),
        _ => None,
    }
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

fn set_pseudo_req(req: &mut ReqHead, key: &str, value: &[u8], caps: Caps) -> Result<(), Limit> {
    match key {
        ":method" => {
            if let Ok(m) = Method::from_bytes(value) {
                req.method = m;
            }
        }
        ":path" => {
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
        ":authority" => {
            apply_plain(&mut req.headers, Op::Replace, "host", value, caps)?;
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
        _ => {}
    }
    Ok(())
}

fn apply_plain(
    h: &mut HeaderMap,
    op: Op,
    key: &str,
    value: &[u8],
    caps: Caps,
) -> Result<(), Limit> {
    let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
        tracing::debug!(key, "filter used an invalid header name; ignored");
        return Ok(());
    };
    if op == Op::Remove {
        h.remove(&name);
        return Ok(());
    }
    let Ok(v) = HeaderValue::from_bytes(value) else {
        tracing::debug!(key, "filter used an invalid header value; ignored");
        return Ok(());
    };
    let before = map_usage(h);
    let added = name.as_str().len().saturating_add(v.len());
    let after = if op == Op::Add {
        (before.0.saturating_add(1), before.1.saturating_add(added))
    } else {
        let (n, b) = h.get_all(&name).iter().fold((0usize, 0usize), |(n, b), v| {
            (n + 1, b.saturating_add(name.as_str().len() + v.len()))
        });
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
    r.map_err(|_| Limit::Headers)
}

fn apply(m: &mut MapMut<'_>, op: Op, key: &str, value: &[u8], caps: Caps) -> Result<(), Limit> {
    let key = key.to_ascii_lowercase();
    match m {
        MapMut::Req(req) => {
            if key.starts_with(':') {
                if op != Op::Remove {
                    set_pseudo_req(req, &key, value, caps)?;
                }
                Ok(())
            } else {
                apply_plain(&mut req.headers, op, &key, value, caps)
            }
        }
        MapMut::Resp(resp) => {
            if key == ":status" {
                if op != Op::Remove {
                    if let Ok(s) = StatusCode::from_bytes(value) {
                        resp.status = s;
                    }
                }
                Ok(())
            } else if !key.starts_with(':') {
                apply_plain(&mut resp.headers, op, &key, value, caps)
            } else {
                Ok(())
            }
        }
        MapMut::Plain(h) => {
            if !key.starts_with(':') {
                apply_plain(h, op, &key, value, caps)
            } else {
                Ok(())
            }
        }
    }
}

impl MapMut<'_> {
    fn headers(&mut self) -> &mut HeaderMap {
        match self {
            MapMut::Req(r) => &mut r.headers,
            MapMut::Resp(r) => &mut r.headers,
            MapMut::Plain(h) => h,
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

pub(crate) fn get_pairs(
    c: &mut Caller<'_, Host>,
    map: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let bytes = serialized(c.data(), map).unwrap_or_default();
    copy_out(c, &bytes, ptr_out, len_out)
}

pub(crate) fn get_size(c: &mut Caller<'_, Host>, map: i32, size_out: i32) -> HostResult {
    let n = serialized(c.data(), map).map(|b| b.len()).unwrap_or(0);
    Ok(match memory::write_u32(c, size_out, n as u32) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn set_pairs(c: &mut Caller<'_, Host>, map: i32, ptr: i32, len: i32) -> HostResult {
    let caps = Caps::of(c.data(), map);
    // The map may be replaced by one as big as the caps, or as the map it
    // replaces (a filter may write back what it read).
    let current = map_mut(c.data_mut(), map).map(|mut m| map_usage(m.headers()));
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
    let Some(mut m) = map_mut(c.data_mut(), map) else {
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
        m.headers().clear();
        for (k, v) in &pairs {
            let op = if k.starts_with(':') {
                Op::Replace
            } else {
                Op::Add
            };
            if let Err(limit) = apply(&mut m, op, k, v, unbounded) {
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
    let key = match memory::read_at_most(c, key_ptr, key_len, max) {
        Ok(Some(k)) => String::from_utf8_lossy(&k).into_owned(),
        Ok(None) => return Ok(Status::NotFound),
        Err(s) => return Ok(s),
    };
    match value(c.data(), map, &key) {
        Some(v) => copy_out(c, &v, ptr_out, len_out),
        None => Ok(Status::NotFound),
    }
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
    let caps = Caps::of(c.data(), map);
    let key = match memory::read_at_most(c, kp, kl, caps.bytes) {
        Ok(Some(k)) => String::from_utf8_lossy(&k).into_owned(),
        // No header has so long a name: nothing to remove, too much to add.
        Ok(None) if op == Op::Remove => return Ok(Status::Ok),
        Ok(None) => {
            let limit = Limit::HeaderBytes;
            return Err(fail_request(c, limit, &limit_detail(limit, caps)));
        }
        Err(s) => return Ok(s),
    };
    let value = if op == Op::Remove {
        Vec::new()
    } else {
        match memory::read_at_most(c, vp, vl, caps.bytes) {
            Ok(Some(v)) => v,
            Ok(None) => {
                let limit = Limit::HeaderBytes;
                return Err(fail_request(c, limit, &limit_detail(limit, caps)));
            }
            Err(s) => return Ok(s),
        }
    };
    if let Some(mut m) = map_mut(c.data_mut(), map) {
        if let Err(limit) = apply(&mut m, op, &key, &value, caps) {
            return Err(fail_request(c, limit, &limit_detail(limit, caps)));
        }
    }
    Ok(Status::Ok)
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
    fn malformed_maps_are_rejected() {
        assert_eq!(deserialize(&[5, 0, 0, 0, 1], 9), Err(MapError::Malformed));
        let bad = [1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(deserialize(&bad, 9), Err(MapError::Malformed));
        let huge = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(deserialize(&huge, 9), Err(MapError::Malformed));
        assert_eq!(deserialize(&[], 0).unwrap().len(), 0);
    }
}
