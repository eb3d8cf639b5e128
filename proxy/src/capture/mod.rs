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
//! Runs once, from the command line; nothing here is on the request path.

pub mod iptables;
