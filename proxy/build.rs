//! Link settings for the `wasp` binary.
//!
//! On glibc Linux the binary is linked with packed relative relocations
//! (RELR). A PIE binary of this size otherwise carries ~1 MB of
//! `.rela.dyn` that the dynamic loader reads at every start, and those
//! pages stay resident for the life of the process: about a tenth of the
//! sidecar's whole RSS. RELR keeps PIE (and ASLR) and shrinks the table to
//! a few KB. It needs binutils >= 2.38 and glibc >= 2.36 (Debian 12), so
//! the flag is used only when a probe program linked with it also runs.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let native = std::env::var("TARGET").ok() == std::env::var("HOST").ok();
    if os == "linux" && env == "gnu" && native && relr_works() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    }
}

/// Links and runs a trivial C program with RELR: the linker must accept
/// the flag and the C library's loader must run the result.
fn relr_works() -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let probe = out.join("relr-probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let linked = Command::new(cc)
        .args(["-x", "c", "-", "-fPIE", "-pie", FLAG, "-o"])
        .arg(&probe)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"int main(void) { return 0; }\n")?;
            }
            child.wait()
        })
        .is_ok_and(|status| status.success());
    let works = linked && Command::new(&probe).status().is_ok_and(|s| s.success());
    if !works {
        println!("cargo:warning=linking without packed relative relocations (the toolchain or C library lacks them); wasp's RSS is ~1 MB higher");
    }
    works
}
