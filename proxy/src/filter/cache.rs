//! The compiled-module cache: on disk (`<cache_dir>/<sha256>-<engine>.cwasm`)
//! so a restart loads instead of compiling, keyed by the module's SHA-256
//! and the engine's `precompile_compatibility_hash` (wasmtime version and
//! every codegen setting), so an artefact from another engine is never
//! loaded.
//!
//! Runs on the control thread during `FilterRuntime::load`. Writes are
//! atomic (temp file + rename); a corrupt or stale entry is recompiled and
//! replaced, never fatal.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `Hasher` feeding SHA-256, so the engine key is stable across builds.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Short key of the engine's compatibility hash.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex(&h.0.finalize()[..8])
}

fn entry_path(dir: &Path, sha: &str, engine_key: &str) -> PathBuf {
    dir.join(format!("{sha}-{engine_key}.cwasm"))
}

/// Loads the module from the cache, or compiles it and stores it.
/// `keep`: the keys of both compilers' engines of this wasmtime build and
/// settings, whichever this process uses (a `winch` server or `wasp filter
/// test` must not delete an `auto` server's Cranelift artefacts in a shared
/// cache); entries of other engines are pruned, none when `keep` is empty.
/// `compile`: how a module not in the cache is compiled (in this process
/// or in a child, see `compile.rs`).
pub(crate) fn load_or_compile(
    engine: &Engine,
    bytes: &[u8],
    sha: &str,
    dir: Option<&Path>,
    keep: &[String],
    compile: impl FnOnce(&Engine, &[u8]) -> anyhow::Result<Module>,
) -> anyhow::Result<Module> {
    let Some(dir) = dir else {
        return compile(engine, bytes);
    };
    if let Some(m) = load_cached(engine, sha, dir) {
        return Ok(m);
    }
    let path = entry_path(dir, sha, &engine_key(engine));
    let module = compile(engine, bytes)?;
    if let Err(e) = store(dir, &path, &module) {
        tracing::warn!(path = %path.display(), error = %e, "could not write module cache entry");
    }
    prune_other_engines(dir, keep);
    Ok(module)
}

/// The module from the disk cache, if `engine` has an artefact of it
/// there (a reload of a module already tiered up starts on Cranelift).
pub(crate) fn load_cached(engine: &Engine, sha: &str, dir: &Path) -> Option<Module> {
    let path = entry_path(dir, sha, &engine_key(engine));
    if !path.is_file() {
        return None;
    }
    // SAFETY: the file is an artefact this process (or an earlier run)
    // wrote with `Module::serialize` into the proxy's own cache
    // directory; its name carries the module hash and the engine's
    // compatibility hash, and wasmtime re-checks the header and engine
    // settings before use. Deserializing is unsafe only for untrusted
    // input, which this is not.
    #[allow(unsafe_code)]
    let loaded = unsafe { Module::deserialize_file(engine, &path) };
    match loaded {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "module cache entry unusable; recompiling");
            None
        }
    }
}

/// Removes artefacts of other engines (an older wasmtime or other settings,
/// or a compiler this process no longer uses).
fn prune_other_engines(dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let suffixes: Vec<String> = keep.iter().map(|k| format!("-{k}.cwasm")).collect();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if stale_tmp(name) {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        // Without both compilers' keys nothing is known to be stale.
        if keep.is_empty() {
            continue;
        }
        if name.ends_with(".cwasm") && !suffixes.iter().any(|s| name.ends_with(s.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A `store` temp file (`<sha>-<key>.tmp<pid>`) whose writer is gone (it
/// exited mid-write): nothing else would ever remove it.
fn stale_tmp(name: &str) -> bool {
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    let Some(pid) = ext.strip_prefix("tmp").and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    cfg!(target_os = "linux")
        && pid != std::process::id()
        && !Path::new(&format!("/proc/{pid}")).exists()
}

/// A Cranelift compile's scratch memory (7-12 MiB for a 100-200 KB module,
/// see docs/benchmarks.md) is freed when it ends, but glibc keeps freed
/// heap pages resident: hand them back, or the process stays at the
/// compile's peak for good. `malloc_trim` takes each arena's lock while it
/// walks that arena's free chunks, so a worker allocating from one waits
/// that long: it runs only on the tier-up thread after a Cranelift compile
/// (one per module per load, hundreds of milliseconds already), not after
/// Winch's compiles on the reload path, never on a worker.
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointers; it only returns free heap
    // pages to the kernel, under glibc's own arena locks.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

fn store(dir: &Path, path: &Path, module: &Module) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = module
        .serialize()
        .map_err(|e| anyhow::anyhow!("serialize: {e:#}"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
