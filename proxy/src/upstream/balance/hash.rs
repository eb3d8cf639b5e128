//! The hash used by the consistent-hash balancers: FNV-1a over the bytes,
//! then the splitmix64 finaliser so nearby inputs spread over the whole
//! range. Fixed and seedless on purpose: every worker and every proxy
//! instance must map the same key to the same endpoint.

/// 64-bit hash of `bytes`, stable across processes and versions.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash of an endpoint's `i`-th point (ring) or its seed (maglev).
pub fn endpoint_hash(addr: &std::net::SocketAddr, i: u64, salt: u64) -> u64 {
    let mut buf = [0u8; 18];
    let len = match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        std::net::IpAddr::V6(v6) => {
            buf[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    buf[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    mix(hash_bytes(&buf[..len + 2]) ^ mix(i.wrapping_add(salt)))
}
