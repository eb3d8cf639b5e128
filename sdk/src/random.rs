//! Randomness from the host (WASI `random_get` in a VM; a seeded generator
//! under [`crate::testing`], so tests are reproducible).

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) {
    crate::host::with(|h| h.random_fill(buf))
}

/// A random `u64`.
pub fn u64() -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_le_bytes(b)
}

/// A random float in `[0, 1)`.
///
/// ```
/// let x = wasp_sdk::random::f64();
/// assert!((0.0..1.0).contains(&x));
/// ```
pub fn f64() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}
