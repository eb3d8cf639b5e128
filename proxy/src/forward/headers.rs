//! Header hygiene between hops (RFC 9110 section 7.6): what a proxy must
//! drop, and what it adds (`x-forwarded-for`, `x-forwarded-proto`, `via`).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::filtered::Framing;

/// Removes hop-by-hop headers and any header the `Connection` header names.
/// `keep_upgrade` keeps `Connection: upgrade` and `Upgrade` for a protocol
/// switch the proxy tunnels. `TE: trailers` survives because gRPC needs it
/// end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names is much
    // cheaper than a hashed removal per hop-by-hop name. Any header named in
    // `Connection` only matters when `Connection` itself is present.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // A message framed by Transfer-Encoding ignores its Content-Length
    // (RFC 9112 section 6.3): hyper read the body by the encoding, so a
    // length left behind would misframe it for the next hop (a hostile
    // upstream declaring 10 bytes and sending megabytes).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade = headers.get(header::UPGRADE).cloned();
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in named.into_iter().chain(present) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        if let Some(u) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
    }
}

/// Headers that describe one connection, never forwarded as they are.
/// Standard names compare as enum tags, so this is cheaper than a lookup
/// per name.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::TE
        || *name == header::PROXY_AUTHORIZATION
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// The `content-length` a message declares (one valid number), if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.trim().parse().ok()
}

/// Frames a message whose head was held until its body's first frame had
/// been through the filters: the whole length when the body ended
/// meanwhile, no length when the filters changed it so far (HTTP/1.1 is
/// then chunked, HTTP/2 has no length), else the declared one. Returns
/// the length the head goes on with, which the body must then keep to.
pub fn reframe(headers: &mut HeaderMap, framing: Framing, declared: u64) -> Option<u64> {
    match framing {
        Framing::Ended(n) => {
            headers.remove(header::TRANSFER_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Some(n)
        }
        Framing::Changed => {
            headers.remove(header::CONTENT_LENGTH);
            None
        }
        Framing::Unchanged => Some(declared),
    }
}

/// Whether the request carries `Expect: 100-continue`.
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether the request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sets the forwarding headers the upstream reads to learn who called
/// and how:
///
/// - `x-forwarded-for`: from a trusted peer (`trust_forwarded`) the peer is
///   appended, every incoming line kept in order; from anyone else the
///   header is **replaced** by the peer's address, so an app reading the
///   first entry cannot be told a made-up client. An IPv4 peer on a
///   dual-stack socket (`::ffff:10.0.0.1`) is written as IPv4.
/// - `x-forwarded-proto`: from a trusted peer (`trust_forwarded`) kept, set
///   to this connection's scheme when absent; from anyone else replaced by
///   this connection's scheme, so a plaintext client cannot claim https.
/// - `x-forwarded-host` and `forwarded` (RFC 7239): kept from a trusted
///   peer, dropped from anyone else (they carry claims wasp cannot check).
/// - `via`: this hop appended.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    scheme: &'static str,
    via: &'static str,
    trusted: bool,
) {
    add_forwarding_for(headers, &client_value(client), scheme, via, trusted);
}

/// The client's address as `X-Forwarded-For` carries it (IPv4-mapped
/// addresses as IPv4). Made once per connection: formatting an address is
/// a good part of what the forwarding headers cost.
pub fn client_value(client: IpAddr) -> HeaderValue {
    use std::fmt::Write as _;
    let mut ip = String::with_capacity(40);
    let _ = write!(ip, "{}", client.to_canonical());
    HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown"))
}

/// [`add_forwarding`] with the client's address already made into a
/// value ([`client_value`]).
pub fn add_forwarding_for(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    scheme: &'static str,
    via: &'static str,
    trusted: bool,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    if trusted {
        append_list(headers, xff, client.as_bytes());
    } else {
        headers.insert(xff, client.clone());
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if trusted {
        headers
            .entry(proto)
            .or_insert(HeaderValue::from_static(scheme));
    } else {
        headers.insert(proto, HeaderValue::from_static(scheme));
        headers.remove(HeaderName::from_static("x-forwarded-host"));
        headers.remove(header::FORWARDED);
    }
    append_via(headers, via);
}

pub fn append_via(headers: &mut HeaderMap, via: &'static str) {
    if headers.contains_key(header::VIA) {
        append_list(headers, header::VIA, via.as_bytes());
    } else {
        headers.insert(header::VIA, HeaderValue::from_static(via));
    }
}

/// Appends `item` to a comma-separated list header. Every field line
/// counts, in order (a second `X-Forwarded-For` line from a trusted hop must
/// not be lost), and values are kept as bytes, so one that is not UTF-8 does
/// not discard the chain.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &[u8]) {
    let mut joined = Vec::new();
    for prev in headers.get_all(&name) {
        joined.extend_from_slice(prev.as_bytes());
        joined.extend_from_slice(b", ");
    }
    let value = if joined.is_empty() {
        HeaderValue::from_bytes(item)
    } else {
        joined.extend_from_slice(item);
        HeaderValue::from_bytes(&joined)
    };
    if let Ok(v) = value {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn fast_check_covers_every_hop_by_hop_name() {
        for name in [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
            header::PROXY_AUTHORIZATION,
            header::TE,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ] {
            assert!(is_hop_by_hop(&name), "{name}");
        }
        assert!(!is_hop_by_hop(&header::HOST));
        assert!(!is_hop_by_hop(&HeaderName::from_static("x-keep-alive")));
    }

    #[test]
    fn held_heads_are_framed_by_what_the_filters_made_of_the_body() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(declared_length(&h), Some(10));
        assert_eq!(reframe(&mut h, Framing::Unchanged, 10), Some(10));
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "10");
        assert_eq!(reframe(&mut h, Framing::Ended(14), 10), Some(14));
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "14");
        assert_eq!(reframe(&mut h, Framing::Changed, 14), None);
        assert!(h.get(header::CONTENT_LENGTH).is_none());
        h.append(header::CONTENT_LENGTH, "3".parse().unwrap());
        h.append(header::CONTENT_LENGTH, "3".parse().unwrap());
        assert_eq!(declared_length(&h), None, "not one value: not held");
        h.insert(header::CONTENT_LENGTH, "x".parse().unwrap());
        assert_eq!(declared_length(&h), None);
    }

    #[test]
    fn keeps_upgrade_when_tunnelling() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn forwarding_headers_append_from_a_trusted_peer() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert(header::VIA, "1.1 edge".parse().unwrap());
        add_forwarding(
            &mut h,
            "127.0.0.2".parse().unwrap(),
            "http",
            "1.1 wasp",
            true,
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.2");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get(header::VIA).unwrap(), "1.1 edge, 1.1 wasp");
    }

    #[test]
    fn forwarding_keeps_every_line_and_non_utf8_values() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.5".parse().unwrap());
        h.insert(
            header::VIA,
            HeaderValue::from_bytes(b"1.1 caf\xe9").unwrap(),
        );
        add_forwarding(
            &mut h,
            "127.0.0.2".parse().unwrap(),
            "http",
            "1.1 wasp",
            true,
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["6.6.6.6, 10.0.0.5, 127.0.0.2"]
        );
        assert_eq!(
            h.get(header::VIA).unwrap().as_bytes(),
            b"1.1 caf\xe9, 1.1 wasp"
        );
    }

    #[test]
    fn untrusted_peers_cannot_claim_proto_or_host() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.append("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "bank.example".parse().unwrap());
        h.insert(
            header::FORWARDED,
            "for=1.2.3.4;proto=https".parse().unwrap(),
        );
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        add_forwarding(
            &mut h,
            "192.0.2.7".parse().unwrap(),
            "http",
            "1.1 wasp",
            false,
        );
        assert_eq!(
            h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(),
            ["http"]
        );
        assert!(h.get("x-forwarded-host").is_none());
        assert!(h.get(header::FORWARDED).is_none());
        // Replaced: only the peer wasp saw, never the client's claim.
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["192.0.2.7"]
        );
    }

    #[test]
    fn mapped_peers_are_written_as_ipv4() {
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            add_forwarding(
                &mut h,
                "::ffff:10.1.2.3".parse().unwrap(),
                "http",
                "1.1 wasp",
                trusted,
            );
            assert_eq!(h.get("x-forwarded-for").unwrap(), "10.1.2.3");
        }
    }

    #[test]
    fn trusted_peers_keep_their_claims() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "shop.example".parse().unwrap());
        h.insert(header::FORWARDED, "proto=https".parse().unwrap());
        add_forwarding(
            &mut h,
            "10.0.0.9".parse().unwrap(),
            "http",
            "1.1 wasp",
            true,
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "shop.example");
        assert_eq!(h.get(header::FORWARDED).unwrap(), "proto=https");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.9");
        // Absent, it is set from the connection even for a trusted peer.
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            "10.0.0.9".parse().unwrap(),
            "https",
            "1.1 wasp",
            true,
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }
}
