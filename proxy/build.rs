//! Link settings for the `wasp` binary.
//!
//! On glibc Linux the binary is linked with packed relative relocations
//! (RELR). A PIE binary of this size otherwise carries ~1 MB of
//! `.rela.dyn` that the dynamic loader reads at every start, and those
//! pages stay resident for the life of the process: about a tenth of the
//! sidecar's whole RSS. RELR keeps PIE (and ASLR) and shrinks the table to
//! a few KB. Needs binutils >= 2.38 and glibc >= 2.36 (Debian 12).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
