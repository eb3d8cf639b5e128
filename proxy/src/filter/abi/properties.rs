//! Properties (`proxy_get_property` / `proxy_set_property`), as listed in
//! `docs/filter-contract.md`: strings are raw UTF-8, integers i64
//! little-endian, booleans one byte (0 or 1), header maps in the ABI map
//! format, each as Envoy encodes the attribute of the same name (checked
//! by `tests/differential.rs`).
//!
//! Runs inside a host call on the VM's thread (and from
//! `StreamFilters::property` for the core). A property that is not
//! available (e.g. `response.code` before response headers, or any stream
//! property on the root context) is NOT_FOUND. Values set by filters live on
//! the stream, keyed by the dot-joined path, and shadow nothing built in.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::Caller;

use super::headers::{authority, serialize};
use super::memory::{self, copy_out, HostResult};
use super::{fail_request, Status};
use crate::filter::host::{Host, StreamData};
use crate::filter::metrics::Limit;

fn int(v: i64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A stream property by dot-joined path.
pub(crate) fn stream_property(s: &StreamData, path: &str) -> Option<Bytes> {
    let text = |v: &str| Some(Bytes::copy_from_slice(v.as_bytes()));
    match path {
        "request.path" => text(
            s.req
                .as_ref()?
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        ),
        "request.url_path" => text(s.req.as_ref()?.uri.path()),
        "request.host" => text(&authority(s.req.as_ref()?)),
        "request.scheme" => text(s.info.scheme),
        "request.method" => text(s.req.as_ref()?.method.as_str()),
        "request.headers" => {
            let req = s.req.as_ref()?;
            Some(Bytes::from(serialize(
                req.headers
                    .iter()
                    .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
            )))
        }
        "request.query" => text(s.req.as_ref()?.uri.query().unwrap_or("")),
        "request.referer" => Some(Bytes::copy_from_slice(
            s.req
                .as_ref()?
                .headers
                .get(http::header::REFERER)?
                .as_bytes(),
        )),
        "request.useragent" => Some(Bytes::copy_from_slice(
            s.req
                .as_ref()?
                .headers
                .get(http::header::USER_AGENT)?
                .as_bytes(),
        )),
        "request.id" => text(&s.info.request_id),
        "request.protocol" => text(s.info.protocol),
        "request.time" => Some(int(nanos(s.info.start))),
        "request.duration" => {
            s.sizes?;
            let d = SystemTime::now()
                .duration_since(s.info.start)
                .unwrap_or_default();
            Some(int(d.as_nanos() as i64))
        }
        "request.size" => Some(int(s.sizes?.0 as i64)),
        "response.size" => Some(int(s.sizes?.1 as i64)),
        "source.address" => text(&s.info.source.to_string()),
        "source.port" => Some(int(i64::from(s.info.source.port()))),
        "source.principal" => text(s.info.principal.as_deref()?),
        "destination.address" => text(&s.info.destination.to_string()),
        "destination.port" => Some(int(i64::from(s.info.destination.port()))),
        "response.code" => Some(int(i64::from(s.resp.as_ref()?.status.as_u16()))),
        "response.headers" => {
            let resp = s.resp.as_ref()?;
            Some(Bytes::from(serialize(
                resp.headers
                    .iter()
                    .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
            )))
        }
        // Envoy's details for an answer the upstream made; wasp's own
        // answers carry their `x-wasp-error` code instead.
        "response.code_details" => {
            s.resp.as_ref()?;
            text(s.error_code.unwrap_or("via_upstream"))
        }
        // No flag is set on an answer the upstream made; wasp's own answers
        // are told by `wasp.error`, not by Envoy's flag bits.
        "response.flags" => {
            s.resp.as_ref()?;
            match s.error_code {
                None => Some(int(0)),
                Some(_) => None,
            }
        }
        "response.grpc_status" => {
            let resp = s.resp.as_ref()?;
            let explicit = s
                .resp_trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| resp.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok()?.trim().parse::<i64>().ok());
            Some(int(explicit.unwrap_or_else(|| {
                i64::from(super::grpc::from_http(resp.status))
            })))
        }
        "upstream.address" => text(&s.upstream?.to_string()),
        "upstream.port" => Some(int(i64::from(s.upstream?.port()))),
        "upstream.local_address" => text(&s.upstream_conn.as_ref()?.local_address?.to_string()),
        // Empty when a response came (nothing failed on its connection);
        // wasp's reason when connecting or the TLS handshake failed.
        "upstream.transport_failure_reason" => match (&s.upstream_conn, &s.upstream_failure) {
            (Some(_), _) => text(""),
            (None, Some(reason)) => text(reason),
            (None, None) => None,
        },
        "upstream.tls_version" => text(upstream_tls(s)?.version),
        // As for `connection.*`: subjects are empty when there is no
        // certificate (or it does not parse), SANs NOT_FOUND; the digest
        // is of the DER as sent, parsed or not.
        "upstream.subject_peer_certificate" => {
            text(upstream_tls(s)?.peer().map_or("", |p| &p.subject))
        }
        "upstream.uri_san_peer_certificate" => text(upstream_tls(s)?.peer()?.uri_san.as_deref()?),
        "upstream.dns_san_peer_certificate" => text(upstream_tls(s)?.peer()?.dns_san.as_deref()?),
        "upstream.sha256_peer_certificate_digest" => text(upstream_tls(s)?.peer_sha256()?),
        "upstream.subject_local_certificate" => {
            text(upstream_tls(s)?.local.as_ref().map_or("", |l| &l.subject))
        }
        "upstream.uri_san_local_certificate" => {
            text(upstream_tls(s)?.local.as_ref()?.uri_san.as_deref()?)
        }
        "upstream.dns_san_local_certificate" => {
            text(upstream_tls(s)?.local.as_ref()?.dns_san.as_deref()?)
        }
        // Plain text or TLS without a client certificate: false.
        "connection.mtls" => Some(Bytes::from_static(
            if s.info.principal.is_some() || s.info.tls.as_ref().is_some_and(|t| t.mtls) {
                &[1]
            } else {
                &[0]
            },
        )),
        // Envoy answers an empty name (not NOT_FOUND) without SNI, plain
        // text included.
        "connection.requested_server_name" => text(
            s.info
                .tls
                .as_ref()
                .and_then(|t| t.sni.as_deref())
                .unwrap_or(""),
        ),
        "connection.tls_version" => text(s.info.tls.as_ref()?.version),
        // Under TLS without a client certificate Envoy answers an empty
        // subject, and NOT_FOUND for the SANs and the digest.
        "connection.subject_peer_certificate" => {
            let tls = s.info.tls.as_ref()?;
            text(tls.peer.as_ref().map_or("", |p| &p.subject))
        }
        "connection.uri_san_peer_certificate" => {
            text(s.info.tls.as_ref()?.peer.as_ref()?.uri_san.as_deref()?)
        }
        "connection.dns_san_peer_certificate" => {
            text(s.info.tls.as_ref()?.peer.as_ref()?.dns_san.as_deref()?)
        }
        "connection.subject_local_certificate" => {
            text(&s.info.tls.as_ref()?.local.as_ref()?.subject)
        }
        "connection.uri_san_local_certificate" => {
            text(s.info.tls.as_ref()?.local.as_ref()?.uri_san.as_deref()?)
        }
        "connection.dns_san_local_certificate" => {
            text(s.info.tls.as_ref()?.local.as_ref()?.dns_san.as_deref()?)
        }
        "connection.sha256_peer_certificate_digest" => {
            text(&s.info.tls.as_ref()?.peer.as_ref()?.sha256)
        }
        "xds.cluster_name" => text(s.cluster.as_deref()?),
        "xds.route_name" => text(s.route.as_deref()?),
        "listener_name" => text(&s.info.listener),
        "route_name" => text(s.route.as_deref()?),
        "cluster_name" => text(s.cluster.as_deref()?),
        "wasp.error" => text(s.error_code?),
        _ => s.props.get(path).cloned(),
    }
}

/// The TLS facts of the connection the upstream's response came on.
fn upstream_tls(s: &StreamData) -> Option<&crate::tls::UpstreamTls> {
    s.upstream_conn.as_ref()?.tls.as_ref()
}

fn property(h: &Host, path: &str) -> Option<Bytes> {
    match path {
        "plugin_name" | "plugin_root_id" | "plugin_vm_id" => {
            Some(Bytes::copy_from_slice(h.plugin.name.as_bytes()))
        }
        _ => stream_property(h.stream()?, path),
    }
}

/// `request\0path` -> `request.path` (a trailing NUL is ignored).
fn join_path(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    String::from_utf8_lossy(raw).replace('\0', ".")
}

/// Bytes of properties filters may set on one stream (paths plus values,
/// plus [`PROPERTY_OVERHEAD`] each). The SDK accepts only OK from
/// `proxy_set_property`, so going past this fails the request by policy.
pub(crate) const MAX_PROPERTY_BYTES: usize = 64 << 10;

/// What each set property costs on top of its path and value.
const PROPERTY_OVERHEAD: usize = 32;

fn props_bytes(s: &StreamData) -> usize {
    s.props.iter().fold(0usize, |n, (k, v)| {
        n.saturating_add(k.len() + v.len() + PROPERTY_OVERHEAD)
    })
}

pub(crate) fn get(
    c: &mut Caller<'_, Host>,
    pp: i32,
    pl: i32,
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    let raw = match memory::read_at_most(c, pp, pl, MAX_PROPERTY_BYTES) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Status::NotFound),
        Err(s) => return Ok(s),
    };
    let path = join_path(&raw);
    match property(c.data(), &path) {
        Some(v) => copy_out(c, &v, ptr_out, len_out),
        None => Ok(Status::NotFound),
    }
}

pub(crate) fn set(c: &mut Caller<'_, Host>, pp: i32, pl: i32, vp: i32, vl: i32) -> HostResult {
    let read = (|| {
        Ok::<_, Status>((
            memory::read_at_most(c, pp, pl, MAX_PROPERTY_BYTES)?,
            memory::read_at_most(c, vp, vl, MAX_PROPERTY_BYTES)?,
        ))
    })();
    let (raw, value) = match read {
        Ok((Some(r), Some(v))) => (r, Bytes::from(v)),
        Ok(_) => {
            let detail = format!("a property over {MAX_PROPERTY_BYTES} bytes");
            return Err(fail_request(c, Limit::Properties, &detail));
        }
        Err(s) => return Ok(s),
    };
    let path = join_path(&raw);
    let Some(s) = c.data_mut().stream_mut() else {
        tracing::debug!(path, "set_property outside a stream; ignored");
        return Ok(Status::Ok);
    };
    let before = props_bytes(s);
    let old = s
        .props
        .get(&path)
        .map_or(0, |v| v.len() + path.len() + PROPERTY_OVERHEAD);
    let after = before
        .saturating_sub(old)
        .saturating_add(path.len() + value.len() + PROPERTY_OVERHEAD);
    if after > MAX_PROPERTY_BYTES && after > before {
        let detail = format!("properties of one stream past {MAX_PROPERTY_BYTES} bytes");
        return Err(fail_request(c, Limit::Properties, &detail));
    }
    s.props.insert(path, value);
    Ok(Status::Ok)
}
