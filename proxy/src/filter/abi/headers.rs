//! Header-map host functions (`proxy_*_header_map_*`) and the ABI's
//! serialized map format.
//!
//! Runs inside a host call on the VM's thread. Maps: request/response headers
//! and trailers of the loaded stream (request headers expose `:method`,
//! `:path`, `:authority`, `:scheme`; response headers `:status`), and the
//! read-only headers/trailers of an `http_call` answer. A map that does not
//! exist in the current phase reads as empty (single value: NOT_FOUND) and
//! ignores writes with OK, because the Rust SDK panics on any other status.

use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, StatusCode, Uri};
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::{Host, ReqHead, RespHead};

const REQUEST_HEADERS: i32 = 0;
const REQUEST_TRAILERS: i32 = 1;
const RESPONSE_HEADERS: i32 = 2;
const RESPONSE_TRAILERS: i32 = 3;
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

/// Parses the ABI map format; `None` if it is malformed.
pub(crate) fn deserialize(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = u32_at(0)?;
    if count > bytes.len() / 8 {
        return None;
    }
    let mut p = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let kl = u32_at(4 + i * 8)?;
        let vl = u32_at(8 + i * 8)?;
        let k = bytes.get(p..p + kl)?;
        p += kl + 1;
        let v = bytes.get(p..p + vl)?;
        p += vl + 1;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
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
        CALL_RESPONSE_HEADERS | CALL_RESPONSE_TRAILERS => {
            let a = h.answer.as_ref()?;
            let list = if map == CALL_RESPONSE_HEADERS {
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
        CALL_RESPONSE_HEADERS | CALL_RESPONSE_TRAILERS => {
            let a = h.answer.as_ref()?;
            let list = if map == CALL_RESPONSE_HEADERS {
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

fn set_pseudo_req(req: &mut ReqHead, key: &str, value: &[u8]) {
    match key {
        ":method" => {
            if let Ok(m) = Method::from_bytes(value) {
                req.method = m;
            }
        }
        ":path" => {
            if let Ok(pq) = PathAndQuery::try_from(value) {
                let mut parts = req.uri.clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(parts) {
                    req.uri = u;
                }
            }
        }
        ":authority" => {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                req.headers.insert(HOST, v);
            }
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
}

fn apply_plain(h: &mut HeaderMap, op: Op, key: &str, value: &[u8]) {
    let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
        tracing::debug!(key, "filter used an invalid header name; ignored");
        return;
    };
    if op == Op::Remove {
        h.remove(&name);
        return;
    }
    let Ok(v) = HeaderValue::from_bytes(value) else {
        tracing::debug!(key, "filter used an invalid header value; ignored");
        return;
    };
    if op == Op::Add {
        h.append(name, v);
    } else {
        h.insert(name, v);
    }
}

fn apply(m: &mut MapMut<'_>, op: Op, key: &str, value: &[u8]) {
    let key = key.to_ascii_lowercase();
    match m {
        MapMut::Req(req) => {
            if key.starts_with(':') {
                if op != Op::Remove {
                    set_pseudo_req(req, &key, value);
                }
            } else {
                apply_plain(&mut req.headers, op, &key, value);
            }
        }
        MapMut::Resp(resp) => {
            if key == ":status" {
                if op != Op::Remove {
                    if let Ok(s) = StatusCode::from_bytes(value) {
                        resp.status = s;
                    }
                }
            } else if !key.starts_with(':') {
                apply_plain(&mut resp.headers, op, &key, value);
            }
        }
        MapMut::Plain(h) => {
            if !key.starts_with(':') {
                apply_plain(h, op, &key, value);
            }
        }
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
    let bytes = match memory::read(c, ptr, len) {
        Ok(b) => b,
        Err(s) => return Ok(s),
    };
    let Some(pairs) = deserialize(&bytes) else {
        return Ok(Status::BadArgument);
    };
    if let Some(mut m) = map_mut(c.data_mut(), map) {
        match &mut m {
            MapMut::Req(r) => r.headers.clear(),
            MapMut::Resp(r) => r.headers.clear(),
            MapMut::Plain(h) => h.clear(),
        }
        for (k, v) in &pairs {
            let op = if k.starts_with(':') {
                Op::Replace
            } else {
                Op::Add
            };
            apply(&mut m, op, k, v);
        }
    }
    Ok(Status::Ok)
}

pub(crate) fn get_value(
    c: &mut Caller<'_, Host>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let key = match memory::read_str(c, key_ptr, key_len) {
        Ok(k) => k,
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
    let key = match memory::read_str(c, kp, kl) {
        Ok(k) => k,
        Err(s) => return Ok(s),
    };
    let value = if op == Op::Remove {
        Vec::new()
    } else {
        match memory::read(c, vp, vl) {
            Ok(v) => v,
            Err(s) => return Ok(s),
        }
    };
    if let Some(mut m) = map_mut(c.data_mut(), map) {
        apply(&mut m, op, &key, &value);
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
        let back = deserialize(&bytes).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[1].0, ":path");
        assert_eq!(back[1].1, b"/x");
        assert_eq!(back[2].1, b"");
    }

    #[test]
    fn malformed_maps_are_rejected() {
        assert!(deserialize(&[5, 0, 0, 0, 1]).is_none());
        assert!(deserialize(&[1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert_eq!(deserialize(&[]).unwrap().len(), 0);
    }
}
