//! Which peers a listener trusts with forwarded headers (`trust_forwarded`).
//!
//! Pure data, parsed on the control thread and read by workers: a list of
//! networks, matched against the connection's peer address. IPv4 peers that
//! arrive as IPv4-mapped IPv6 (`::ffff:10.0.0.1`, a dual-stack socket) match
//! IPv4 networks, and mapped networks (`::ffff:10.0.0.0/104`) are read as
//! the IPv4 networks they are.

use std::net::IpAddr;

/// One network: an address and a prefix length (a single address is a
/// full-length prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// `"10.0.0.0/8"`, `"fd00::/8"`, or a single address (`"127.0.0.1"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "expected an IP address or CIDR like \"10.0.0.0/8\"".to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("the prefix length must be 0..={max}")),
            },
        };
        // `::ffff:10.0.0.0/104` is 10.0.0.0/8: peers are matched in their
        // IPv4 form, so a mapped network must be too.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), Some(p)) = (v6.to_ipv4_mapped(), prefix.checked_sub(96)) {
                return Ok(Self {
                    addr: IpAddr::V4(v4),
                    prefix: p,
                });
            }
        }
        Ok(Self { addr, prefix })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // IPv4-mapped IPv6 peers as the IPv4 address they carry.
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix)
            }
            // An IPv6 network wider than the mapped range (`::/0`) holds
            // IPv4 peers in their mapped form.
            (IpAddr::V6(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(net),
                u128::from(ip.to_ipv6_mapped()),
                self.prefix,
            ),
            _ => false,
        }
    }
}

/// `addr/prefix`, as iptables and the config take it.
impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether the first `prefix` bits (from the top) of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, prefix: u8) -> bool {
    let mask = match u32::from(prefix) {
        0 => 0,
        p => u128::MAX.checked_shl(128 - p.min(128)).unwrap_or(0),
    };
    (a & mask) == (b & mask)
}

/// The listener's trusted peers; empty trusts no one (the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedPeers(Vec<Net>);

impl TrustedPeers {
    pub fn new(nets: Vec<Net>) -> Self {
        Self(nets)
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusts(nets: &[&str], ip: &str) -> bool {
        let nets = nets.iter().map(|n| Net::parse(n).unwrap()).collect();
        TrustedPeers::new(nets).trusts(ip.parse().unwrap())
    }

    #[test]
    fn networks_and_single_addresses() {
        assert!(trusts(&["10.0.0.0/8"], "10.200.1.2"));
        assert!(!trusts(&["10.0.0.0/8"], "11.0.0.1"));
        assert!(trusts(&["127.0.0.1"], "127.0.0.1"));
        assert!(!trusts(&["127.0.0.1"], "127.0.0.2"));
        assert!(trusts(&["0.0.0.0/0"], "8.8.8.8"));
        assert!(trusts(&["fd00::/8"], "fd12::1"));
        assert!(!trusts(&["fd00::/8"], "fe80::1"));
        assert!(trusts(&["::/0"], "2001:db8::1"));
        // A dual-stack socket reports IPv4 peers as mapped IPv6.
        assert!(trusts(&["10.0.0.0/8"], "::ffff:10.1.2.3"));
        assert!(!trusts(&["10.0.0.0/8"], "2001:db8::1"));
        assert!(!trusts(&[], "127.0.0.1"));
    }

    /// IPv4-mapped networks are the IPv4 networks they carry, and a wide
    /// IPv6 network holds IPv4 peers in their mapped form.
    #[test]
    fn mapped_networks_match_ipv4_peers() {
        assert_eq!(
            Net::parse("::ffff:10.0.0.0/104").unwrap(),
            Net::parse("10.0.0.0/8").unwrap()
        );
        assert!(trusts(&["::ffff:10.0.0.0/104"], "10.1.2.3"));
        assert!(trusts(&["::ffff:10.0.0.0/104"], "::ffff:10.1.2.3"));
        assert!(!trusts(&["::ffff:10.0.0.0/104"], "11.1.2.3"));
        assert!(trusts(&["::ffff:127.0.0.1"], "127.0.0.1"));
        assert!(trusts(&["::/0"], "127.0.0.1"));
        assert!(trusts(&["::ffff:0:0/96"], "8.8.8.8"));
        assert!(!trusts(&["fd00::/8"], "10.0.0.1"));
    }

    #[test]
    fn bad_entries_are_errors() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "ten.0.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/x",
            "",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
    }
}
