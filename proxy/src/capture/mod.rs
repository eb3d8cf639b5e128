//! Traffic capture: getting the pod's TCP into the sidecar without the
//! app's help.
//!
//! `iptables` writes the redirect rules (`wasp iptables`, run once per
//! network namespace, typically by an init container with `NET_ADMIN`):
//! the app's outbound TCP goes to the outbound listener, TCP arriving at the
//! pod goes to the inbound listener, and the proxy's own connections
//! (its UID), loopback and configured exclusions are left alone. It drives
//! the distribution's `iptables-restore`/`ip6tables-restore`, as
//! istio-iptables and linkerd-init do, and keeps every rule in chains of
//! its own so they can be listed and removed.
//!
//! `detect` tells HTTP/1, HTTP/2, TLS (with SNI and ALPN) and opaque TCP
//! apart from a connection's first bytes: a pure function, fuzzed in the
//! suite; `peek` runs it on a live socket's peeked bytes, and [`classify`]
//! decides a captured connection's path: HTTP (the listener's hyper path,
//! bytes untouched) or L4 (the `l4` module, with the SNI when it was TLS).
//!
//! `iptables` runs once, from the command line; `classify` runs once per
//! captured connection, on its worker, before any request.

pub mod detect;
pub mod iptables;
pub mod peek;
pub mod relay;

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::config::{CaptureMode, Config, L4Config};
use detect::Detection;

/// Which path a captured connection takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// HTTP/1 or HTTP/2: the listener's HTTP serving, routes by `Host`.
    Http,
    /// Opaque TCP or TLS (with its SNI): proxied at L4.
    Tcp { sni: Option<String> },
}

/// Decides a connection's path on a capture listener. A connection made to
/// the listener directly (no original destination) is HTTP, as on any
/// listener; `opaque_ports` and `detect_protocol = false` skip detection.
pub async fn classify(
    stream: &TcpStream,
    original_dst: Option<SocketAddr>,
    l4: &L4Config,
) -> Class {
    let Some(dst) = original_dst else {
        return Class::Http;
    };
    if !l4.detect_protocol || l4.opaque_ports.contains(&dst.port()) {
        return Class::Tcp { sni: None };
    }
    match peek::sniff(stream, l4.detect_timeout).await {
        // Undecided when time ran out (a slow or split first segment):
        // HTTP, whose path answers a bad or late request itself. Opaque
        // here would let "G", a pause, then "ET /admin ..." reach the app
        // without the HTTP filters.
        Detection::Http1 | Detection::Http2 | Detection::NeedMore => Class::Http,
        Detection::Tls(hello) => Class::Tcp { sni: hello.sni },
        Detection::Opaque => Class::Tcp { sni: None },
    }
}

/// Where a connection on a capture listener in `mode` goes when no route
/// claims it (its original destination), unless that is one of this
/// proxy's own listeners (sending it there would loop the connection back
/// into the proxy): such a connection is served as if made directly.
///
/// Inbound, the destination is this host's address the connection arrived
/// on (with the original port), never the address the client asked for:
/// iptables only redirects traffic for local addresses here, and even with
/// rules that redirect more, the inbound listener cannot become a relay to
/// other hosts.
pub fn original_dst(stream: &TcpStream, mode: CaptureMode, config: &Config) -> Option<SocketAddr> {
    let original = relay::original_dst(stream)?;
    let local = stream.local_addr().ok()?;
    destination(
        mode,
        original,
        local,
        config.listeners.iter().map(|l| l.bind),
    )
}

/// [`original_dst`] on plain addresses: `local` is the accepted socket's
/// address, `binds` the proxy's listener addresses.
fn destination(
    mode: CaptureMode,
    original: SocketAddr,
    local: SocketAddr,
    mut binds: impl Iterator<Item = SocketAddr>,
) -> Option<SocketAddr> {
    let dst = match mode {
        CaptureMode::Inbound => SocketAddr::new(local.ip().to_canonical(), original.port()),
        CaptureMode::Outbound => original,
    };
    // A listener on 0.0.0.0/[::] is "own" only for this host's addresses:
    // loopback, and the address the connection arrived on (a REDIRECT
    // lands on the incoming interface's primary address). Another host's
    // same port (other-svc:8080 while wasp listens on 0.0.0.0:8080) is not.
    let ip = dst.ip().to_canonical();
    let this_host = ip.is_loopback() || ip == local.ip().to_canonical();
    let own = binds.any(|b| {
        let bind = b.ip().to_canonical();
        b.port() == dst.port()
            && (bind == ip
                || (bind.is_unspecified() && this_host)
                || (bind.is_loopback() && ip.is_loopback()))
    });
    (!own).then_some(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected loopback pair (client, accepted); also used by
    /// `peek`'s tests.
    pub(super) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")).0,
        )
    }

    fn capture() -> L4Config {
        L4Config {
            detect_protocol: true,
            detect_timeout: Duration::from_millis(100),
            ..L4Config::default()
        }
    }

    /// "G", a pause longer than the detection timeout, then the rest of the
    /// request: still HTTP (the filters see it), never passed through.
    #[tokio::test]
    async fn a_request_split_across_the_detect_timeout_stays_http() {
        let dst = Some(SocketAddr::from(([10, 0, 0, 9], 8080)));
        let (mut client, server) = pair().await;
        client
            .write_all(b"G")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let class = classify(&server, dst, &capture()).await;
        assert_eq!(class, Class::Http);
        client
            .write_all(b"ET /admin HTTP/1.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        let (mut client, server) = pair().await;
        client
            .write_all(b"\r\nGET /admin HTTP/1.1\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(classify(&server, dst, &capture()).await, Class::Http);

        // Silent and non-HTTP clients still go to L4.
        let (_silent, server) = pair().await;
        assert_eq!(
            classify(&server, dst, &capture()).await,
            Class::Tcp { sni: None }
        );
        let (mut client, server) = pair().await;
        client
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            classify(&server, dst, &capture()).await,
            Class::Tcp { sni: None }
        );
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// Inbound, whatever destination the client asked for, the connection
    /// goes to this host (the address it arrived on): never to another host.
    #[test]
    fn inbound_goes_to_this_host_only() {
        let local = addr("10.1.2.3:15006");
        let binds = || [addr("0.0.0.0:15006"), addr("0.0.0.0:15001")].into_iter();
        assert_eq!(
            destination(CaptureMode::Inbound, addr("10.1.2.3:8080"), local, binds()),
            Some(addr("10.1.2.3:8080"))
        );
        assert_eq!(
            destination(
                CaptureMode::Inbound,
                addr("93.184.216.34:25"),
                local,
                binds()
            ),
            Some(addr("10.1.2.3:25"))
        );
        // A v4 client on a dual-stack socket: dialled as plain IPv4.
        assert_eq!(
            destination(
                CaptureMode::Inbound,
                addr("10.1.2.3:8080"),
                addr("[::ffff:10.1.2.3]:15006"),
                binds()
            ),
            Some(addr("10.1.2.3:8080"))
        );
        assert_eq!(
            destination(
                CaptureMode::Outbound,
                addr("93.184.216.34:443"),
                local,
                binds()
            ),
            Some(addr("93.184.216.34:443"))
        );
    }

    /// Only this host's addresses loop back into a listener on 0.0.0.0; the
    /// same port on another host is a destination like any other.
    #[test]
    fn own_listeners_are_this_hosts_addresses_only() {
        let binds = || {
            [
                addr("0.0.0.0:8080"),
                addr("0.0.0.0:15001"),
                addr("10.1.2.3:9000"),
            ]
            .into_iter()
        };
        let local = addr("127.0.0.1:15001");
        let out = |dst: &str, local: SocketAddr| {
            destination(CaptureMode::Outbound, addr(dst), local, binds())
        };
        assert_eq!(
            out("10.9.9.9:8080", local),
            Some(addr("10.9.9.9:8080")),
            "other-svc:8080"
        );
        assert_eq!(out("127.0.0.1:8080", local), None);
        assert_eq!(out("[::1]:8080", local), None);
        assert_eq!(out("10.1.2.3:9000", local), None);
        assert_eq!(out("10.9.9.9:9000", local), Some(addr("10.9.9.9:9000")));
        // Redirected from outside: arrives on the pod's address.
        assert_eq!(out("10.1.2.3:8080", addr("10.1.2.3:15001")), None);
        assert_eq!(
            out("[::ffff:10.1.2.3]:15001", addr("[::ffff:10.1.2.3]:15001")),
            None
        );
        // Inbound to the inbound port itself: served directly.
        assert_eq!(
            destination(
                CaptureMode::Inbound,
                addr("10.1.2.3:15001"),
                addr("10.1.2.3:15001"),
                binds()
            ),
            None
        );
    }
}
