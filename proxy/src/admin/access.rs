//! Who may call which admin endpoint: pure decisions on a request head and
//! its peer address, no IO (unit-tested below, end to end in tests/admin.rs).
//!
//! Three classes:
//! - **open** (`/live`, `/ready`, `/metrics`): anyone who reaches the port;
//!   this is what the kubelet and Prometheus need, and all the probes
//!   address serves.
//! - **guarded reads** (`GET /config`, `/filters`, `/clusters`, `/reload`):
//!   `/config` is the config after `${VAR}` substitution (secrets);
//!   `/filters` and `/reload` carry error text that can echo configured
//!   values; `/clusters` maps the mesh's endpoints. No probe needs them.
//! - **changes** (`POST /shutdown`, `POST /reload`, `PUT|POST /logging`, and
//!   any other method): they act.
//!
//! Without `[admin] token`, guarded reads and changes answer only loopback
//! peers, whose `Host` is an IP literal or `localhost` (which a
//! DNS-rebinding page cannot produce); changes must also be requests a
//! browser cannot send cross-origin without a CORS preflight (which this
//! server never grants): they carry `x-wasp-admin` or a JSON
//! `Content-Type`. A `text/plain` form POST has neither.
//!
//! With `[admin] token`, every caller, loopback too, sends
//! `Authorization: Bearer <token>` (compared in constant time). Loopback is
//! not exempt because in a pod every container shares it: a configured
//! token means "only who holds it". The token stands in for the Host and
//! header checks (a browser page can neither know it nor attach it
//! cross-origin without a preflight), so a tool may call by DNS name.

use std::net::{IpAddr, SocketAddr};

use http::{header, HeaderMap, Method, Uri};

/// The custom header that makes a change a non-simple request.
pub const ADMIN_HEADER: &str = "x-wasp-admin";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Open,
    GuardedRead,
    Change,
}

/// Why a request is refused; the text is the response body.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

/// The class of `method path`. Open endpoints stay open for any method (a
/// wrong one gets 405 later); anything that is not a read is a change.
pub fn classify(method: &Method, path: &str) -> Class {
    if matches!(path, "/live" | "/ready" | "/metrics") {
        Class::Open
    } else if method == Method::GET || method == Method::HEAD {
        Class::GuardedRead
    } else {
        Class::Change
    }
}

/// `Ok` when the request may proceed.
pub fn check(
    class: Class,
    peer: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), Refusal> {
    if class == Class::Open {
        return Ok(());
    }
    // A valid token is proof enough: a page in a browser can neither know it
    // nor send an Authorization header cross-origin without a preflight, so
    // the Host and non-simple checks below (which stand in for it on
    // loopback) would add nothing, and a caller may use a DNS name.
    if let Some(token) = token {
        return check_token(headers, token);
    }
    if !peer.ip().to_canonical().is_loopback() {
        return Err(Refusal(format!(
            "admin endpoints other than /live, /ready and /metrics answer only loopback callers when no [admin] token is set (you are {})",
            peer.ip()
        )));
    }
    check_host(uri, headers)?;
    if class == Class::Change && !non_simple(headers) {
        return Err(Refusal(format!(
            "this endpoint changes the proxy: send the header `{ADMIN_HEADER}: 1` (or a JSON Content-Type) so a web page cannot send it from a browser"
        )));
    }
    Ok(())
}

/// Every `Host` (and an absolute-form authority) names an IP literal or
/// `localhost`. A request with neither (HTTP/1.0) is not from a browser.
fn check_host(uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    let hosts = headers
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .chain(uri.authority().map(|a| a.as_str()));
    for host in hosts {
        if !host_allowed(host) {
            return Err(Refusal(format!(
                "Host \"{}\" is not an IP address or localhost; admin endpoints refuse other names (DNS rebinding)",
                host.escape_debug()
            )));
        }
    }
    Ok(())
}

fn host_allowed(host: &str) -> bool {
    let host = host.trim();
    if host.parse::<IpAddr>().is_ok() || host.parse::<SocketAddr>().is_ok() {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return false,
        None => host,
    };
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    name.eq_ignore_ascii_case("localhost")
}

fn check_token(headers: &HeaderMap, token: &str) -> Result<(), Refusal> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal(
            "the Authorization bearer token does not match [admin] token".into(),
        )),
        None => Err(Refusal(
            "[admin] token is set: send `Authorization: Bearer <token>`".into(),
        )),
    }
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right (the length may show; it is not the secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    diff == 0
}

/// A request a browser only sends cross-origin after a CORS preflight.
fn non_simple(headers: &HeaderMap) -> bool {
    if headers.contains_key(ADMIN_HEADER) || headers.contains_key(header::AUTHORIZATION) {
        return true;
    }
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const LOOP: &str = "127.0.0.1:5000";
    const REMOTE: &str = "10.1.2.3:5000";
    const TOKEN: &str = "0123456789abcdef0123";

    fn run(class: Class, peer: &str, h: &[(&str, &str)], token: Option<&str>) -> bool {
        check(
            class,
            peer.parse().unwrap(),
            &Uri::from_static("/x"),
            &head(h),
            token,
        )
        .is_ok()
    }

    #[test]
    fn classes() {
        assert_eq!(classify(&Method::POST, "/ready"), Class::Open);
        assert_eq!(classify(&Method::GET, "/metrics"), Class::Open);
        assert_eq!(classify(&Method::GET, "/config"), Class::GuardedRead);
        assert_eq!(classify(&Method::GET, "/filters"), Class::GuardedRead);
        assert_eq!(classify(&Method::POST, "/shutdown"), Class::Change);
        assert_eq!(classify(&Method::PUT, "/logging"), Class::Change);
        assert_eq!(classify(&Method::OPTIONS, "/shutdown"), Class::Change);
    }

    #[test]
    fn open_endpoints_need_nothing() {
        assert!(run(
            Class::Open,
            REMOTE,
            &[("host", "evil.example")],
            Some(TOKEN)
        ));
    }

    #[test]
    fn without_a_token_only_loopback() {
        let h = [("host", "127.0.0.1:9901"), (ADMIN_HEADER, "1")];
        assert!(run(Class::Change, LOOP, &h, None));
        assert!(run(Class::Change, "[::1]:5", &h, None));
        assert!(run(Class::Change, "[::ffff:127.0.0.1]:5", &h, None));
        assert!(!run(Class::Change, REMOTE, &h, None));
        assert!(!run(Class::GuardedRead, REMOTE, &h, None));
    }

    #[test]
    fn with_a_token_everyone_needs_it() {
        let good = format!("Bearer {TOKEN}");
        let h = [
            ("host", "wasp-admin.mesh.svc:9901"),
            ("authorization", good.as_str()),
        ];
        assert!(run(Class::Change, REMOTE, &h, Some(TOKEN)));
        assert!(run(Class::Change, LOOP, &h, Some(TOKEN)));
        let plain = [("host", "localhost"), (ADMIN_HEADER, "1")];
        assert!(!run(Class::Change, LOOP, &plain, Some(TOKEN)));
        let wrong = [
            ("host", "localhost"),
            ("authorization", "Bearer 0123456789abcdef0124"),
        ];
        assert!(!run(Class::Change, REMOTE, &wrong, Some(TOKEN)));
        let basic = [("authorization", "Basic 0123456789abcdef0123")];
        assert!(!run(Class::GuardedRead, REMOTE, &basic, Some(TOKEN)));
    }

    #[test]
    fn changes_must_be_non_simple() {
        let form = [("host", "127.0.0.1"), ("content-type", "text/plain")];
        assert!(!run(Class::Change, LOOP, &form, None));
        assert!(run(Class::GuardedRead, LOOP, &form, None));
        let json = [
            ("host", "127.0.0.1"),
            ("content-type", "application/json; charset=utf-8"),
        ];
        assert!(run(Class::Change, LOOP, &json, None));
    }

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.0.0.7:15000",
            "[::1]:9901",
            "[::1]",
            "::1",
            "localhost",
            "LocalHost:9901",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "localhost:",
            "localhost:x",
            "[evil]:1",
            "",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
        let h = [("host", "127.0.0.1"), (ADMIN_HEADER, "1")];
        let absolute = Uri::from_static("http://evil.example/shutdown");
        let peer = LOOP.parse().unwrap();
        assert!(check(Class::Change, peer, &absolute, &head(&h), None).is_err());
        let two = [
            ("host", "127.0.0.1"),
            ("host", "evil.example"),
            (ADMIN_HEADER, "1"),
        ];
        assert!(!run(Class::Change, LOOP, &two, None));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
