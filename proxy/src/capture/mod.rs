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
//! suite, that the capture listeners (not wired yet) will call on peeked
//! bytes.
//!
//! `iptables` runs once, from the command line; `detect` will run once per
//! captured connection, before any request.

pub mod detect;
pub mod iptables;
pub mod relay;
