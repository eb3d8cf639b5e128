//! Where filter modules are compiled: in this process ([`CompileMode::InProcess`],
//! unit tests and `wasp filter test`, whose executable is not a server) or
//! in a child process of the same binary ([`CompileMode::Child`], what
//! `wasp run` uses for every compile, Winch at load and Cranelift at
//! tier-up).
//!
//! Why a child: a `.wasm` in the filters directory is outside input, and a
//! compiler bug that aborts, overflows the stack, eats all memory or hangs
//! on a hostile module would otherwise end the proxy (`catch_unwind` only
//! catches panics). It is not a sandbox against a compromised compiler: a
//! memory-corruption bug a module exploits owns the child and so the
//! artefact the proxy then runs, as it would in-process. It also keeps the compilers' code and scratch heap out of the
//! server's resident set (VmHWM never comes down after a peak).
//!
//! The child is `wasp __compile-module --compiler C`: it reads the module
//! from stdin, builds the engine with the server's [`engine_config`] for that
//! compiler (one pool slot: the pool size is not part of the compatibility
//! hash) and writes `Engine::precompile_module`'s artefact to stdout. The
//! parent caps what it reads (from the module's size), kills the child on
//! a wall-clock timeout, and sets `RLIMIT_DATA` (heap; the pooling
//! allocator's reservations are `PROT_NONE` and do not count),
//! `RLIMIT_CORE` 0 and `RLIMIT_CPU` in the child before exec. A child that fails in any way is a compile error: no
//! in-process retry, which would let the module crash the proxy after all.
//!
//! Runs on the thread that loads (control thread, or the tier-up thread);
//! it blocks that thread for the compile, as an in-process compile did.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use wasmtime::{Engine, Module};

use super::engine::engine_config;
use super::plugin::Compiler;

/// The hidden subcommand the server runs itself as to compile a module.
pub const SUBCOMMAND: &str = "__compile-module";

/// Most stderr bytes kept from a child (its last lines name the failure).
const STDERR_CAP: usize = 16 * 1024;

/// The artefact read back is capped from the module's size, not from
/// `wasm_compile_memory` (1 GiB by default), which the proxy itself would
/// otherwise buffer: measured expansion is ~7x for Winch, so 64x plus some
/// slack is far above any honest compile, and a fixed ceiling bounds it.
const ARTEFACT_PER_WASM_BYTE: usize = 64;
const ARTEFACT_SLACK: usize = 4 * 1024 * 1024;
const ARTEFACT_MAX: usize = 256 * 1024 * 1024;

/// Most artefact bytes accepted for a module of `wasm_len` bytes.
fn artefact_cap(wasm_len: usize) -> usize {
    wasm_len
        .saturating_mul(ARTEFACT_PER_WASM_BYTE)
        .saturating_add(ARTEFACT_SLACK)
        .min(ARTEFACT_MAX)
}

/// How filter modules are compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompileMode {
    /// On the calling thread (unit tests, `wasp filter test`).
    InProcess,
    /// In a child process of this binary, with these limits (`wasp run`).
    Child(ChildLimits),
}

/// `[proxy] wasm_compile_timeout` and `wasm_compile_memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildLimits {
    /// Wall-clock time a compile may take; the child is killed after it.
    pub timeout: Duration,
    /// The child's `RLIMIT_DATA` (bytes).
    pub memory: u64,
}

/// Compiles `bytes` for `engine` (built by `engine_config(_, compiler)`) as
/// `mode` says.
pub(crate) fn compile(
    mode: &CompileMode,
    engine: &Engine,
    compiler: Compiler,
    bytes: &[u8],
) -> anyhow::Result<Module> {
    match mode {
        CompileMode::InProcess => {
            Module::new(engine, bytes).map_err(|e| anyhow!("compile error: {e:#}"))
        }
        CompileMode::Child(limits) => {
            let artefact = in_child(limits, compiler, bytes)?;
            // SAFETY: the bytes are `Engine::precompile_module` output of
            // this very binary (the running inode, see `exe`), read over a
            // pipe only we and the child hold, from an engine built with the
            // same `engine_config`. wasmtime checks the artefact's header
            // and the engine's compatibility hash before using it, so a
            // truncated or mismatched artefact is an error, not code run.
            // The module's wasm never runs in the child. What the child
            // isolates is crashes, aborts, stack overflow, running out of
            // memory and hangs in the compiler; not a compromise of the
            // compiler: a memory-corruption bug a module triggers could
            // give it the child and so this output, which we then run.
            // That is the same exposure as compiling in-process (where it
            // would own the proxy directly), not a new one.
            #[allow(unsafe_code)]
            let module = unsafe { Module::deserialize(engine, &artefact) };
            module.map_err(|e| {
                anyhow!("loading the compiled module from the compiler process: {e:#}")
            })
        }
    }
}

/// The executable to run as the compiler: `/proc/self/exe` on Linux, which
/// is the running inode even when an upgrade replaced or deleted the file
/// on disk (so parent and child are always the same build). Elsewhere the
/// path the process started from.
fn exe() -> anyhow::Result<PathBuf> {
    if cfg!(target_os = "linux") {
        Ok(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe().map_err(|e| anyhow!("finding wasp's own executable: {e}"))
    }
}

/// Runs the compiler child on `bytes`; its artefact.
fn in_child(limits: &ChildLimits, compiler: Compiler, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let exe = exe()?;
    let mut cmd = Command::new(&exe);
    // `ps` would otherwise show argv[0] as `/proc/self/exe`.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::arg0(&mut cmd, "wasp");
    cmd.arg(SUBCOMMAND)
        .arg("--compiler")
        .arg(compiler.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A backtrace would only bury the failure in the stderr tail
        // (and "skipping backtrace printing" on out of memory).
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    set_limits(&mut cmd, limits);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        anyhow!(
            "cannot start the compiler process ({} {SUBCOMMAND}): {e}",
            exe.display()
        )
    })?;
    let pid = child.id();
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the compiler process has no pipes");
    };
    // The child reads all of stdin before it writes, but may die early:
    // the writer's broken pipe then only means "see the exit status".
    let input = bytes.to_vec();
    let writer = std::thread::Builder::new()
        .name("wasp-compile-in".into())
        .spawn(move || {
            let _ = stdin.write_all(&input);
        });
    let cap = artefact_cap(bytes.len());
    let reader = std::thread::Builder::new()
        .name("wasp-compile-out".into())
        .spawn(move || {
            let mut out = Vec::new();
            // `take` bounds what is buffered; `read_to_end` grows the
            // vector as bytes arrive, reserving nothing up front.
            let read = (&mut stdout)
                .take(u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1))
                .read_to_end(&mut out);
            (read.map(|_| ()), out)
        });
    let errs = std::thread::Builder::new()
        .name("wasp-compile-err".into())
        .spawn(move || {
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(buf.get(..n).unwrap_or_default());
                if tail.len() > STDERR_CAP {
                    let cut = tail.len() - STDERR_CAP;
                    tail.drain(..cut);
                }
            }
            String::from_utf8_lossy(&tail).into_owned()
        });
    let (writer, reader, errs) = match (writer, reader, errs) {
        (Ok(w), Ok(r), Ok(e)) => (w, r, e),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("cannot start the threads that feed the compiler process");
        }
    };
    // Poll the exit: std has no wait with a timeout. Backing off from 1 ms
    // keeps a ~40 ms Winch compile from waiting long for its result.
    let deadline = started + limits.timeout;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) => {}
            Err(e) => {
                // Not left running (and holding the pipes the threads
                // below are joined on) when its status cannot be read.
                let _ = child.kill();
                let _ = child.wait();
                break Err(anyhow!("waiting for the compiler process: {e}"));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break Err(anyhow!(
                "compiling timed out after {:?} ([proxy] wasm_compile_timeout); the compiler process was killed",
                limits.timeout
            ));
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    let _ = writer.join();
    let (read, out) = reader
        .join()
        .unwrap_or_else(|_| (Err(std::io::Error::other("reader panicked")), Vec::new()));
    let stderr = errs.join().unwrap_or_default();
    let status = status?;
    let elapsed = started.elapsed();
    if !status.success() {
        bail!("{}", failure(status, &stderr, limits));
    }
    read.map_err(|e| anyhow!("reading the compiler process's output: {e}"))?;
    if out.len() > cap {
        bail!(
            "compiled artefact larger than {cap} bytes (at most {ARTEFACT_PER_WASM_BYTE} x the module's {} bytes + {ARTEFACT_SLACK}, and never above {ARTEFACT_MAX})",
            bytes.len()
        );
    }
    tracing::info!(
        pid,
        compiler = compiler.name(),
        ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        wasm_bytes = bytes.len(),
        artefact_bytes = out.len(),
        "module compiled in a child process"
    );
    Ok(out)
}

/// Why a child that did not exit 0 failed, in words.
fn failure(status: ExitStatus, stderr: &str, limits: &ChildLimits) -> String {
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let last = last.strip_prefix("error: ").unwrap_or(last);
    // Rust's allocation-failure handler prints this, then aborts; its
    // lines ("memory allocation of N bytes failed") add nothing to this.
    if stderr.contains("memory allocation of") {
        return format!(
            "the compiler ran out of memory (limit {} bytes, [proxy] wasm_compile_memory)",
            limits.memory
        );
    }
    if stderr.contains("has overflowed its stack") {
        return format!("the compiler overflowed its stack: {last}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let what = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGXCPU => " (SIGXCPU: CPU time limit)",
                _ => "",
            };
            return format!("the compiler process was killed by signal {sig}{what}: {last}");
        }
    }
    if last.is_empty() {
        format!("the compiler process failed ({status})")
    } else {
        last.to_string()
    }
}

/// Limits set in the child between fork and exec (Linux): heap, no core
/// file, CPU seconds as a backstop to the wall-clock timeout, and death
/// with the parent.
///
/// Each limit only ever lowers this process's own: soft and hard become
/// `min(wanted, current hard)`. Raising a hard limit needs
/// `CAP_SYS_RESOURCE`, so a wasp started under a lower one (systemd
/// `LimitCPU=`/`LimitDATA=`, a container's ulimits) would otherwise get
/// EPERM and fail every compile. The current limits are read here, in the
/// parent, so the child only calls setrlimit.
#[cfg(target_os = "linux")]
fn set_limits(cmd: &mut Command, limits: &ChildLimits) {
    use std::os::unix::process::CommandExt;
    // `wanted`, lowered to this process's hard limit on `resource`. If
    // the limit cannot be read, `wanted`: setrlimit then says what is wrong.
    let capped = |resource, wanted: libc::rlim_t| -> libc::rlim_t {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into a valid, owned struct.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::getrlimit(resource, &mut cur) } == 0;
        if ok {
            wanted.min(cur.rlim_max)
        } else {
            wanted
        }
    };
    let data = capped(libc::RLIMIT_DATA, limits.memory as libc::rlim_t);
    let cpu = capped(
        libc::RLIMIT_CPU,
        limits.timeout.as_secs().saturating_add(2) as libc::rlim_t,
    );
    let core = capped(libc::RLIMIT_CORE, 0);
    // Captured before the fork: in the child, `getppid` is compared to it.
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (setrlimit, prctl, getppid) on
    // stack values; it allocates nothing and takes no locks.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            let set = |resource, value: libc::rlim_t| {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_CORE, core)?;
            set(libc::RLIMIT_DATA, data)?;
            set(libc::RLIMIT_CPU, cpu)?;
            // A compile must not outlive the proxy that asked for it. The
            // death signal is only armed from here on: a parent that died
            // between fork and prctl shows as a different parent pid.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_limits(_cmd: &mut Command, _limits: &ChildLimits) {}

/// `wasp __compile-module --compiler C`: module on stdin, artefact on
/// stdout, error on stderr and exit 1.
pub fn child_main(compiler: &str) -> std::process::ExitCode {
    match child(compiler) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn child(compiler: &str) -> anyhow::Result<()> {
    let compiler = match compiler {
        "winch" => Compiler::Winch,
        "cranelift" => Compiler::Cranelift,
        other => bail!("unknown compiler {other:?} (winch or cranelift)"),
    };
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("reading the module from stdin: {e}"))?;
    let engine = Engine::new(&engine_config(1, compiler))
        .map_err(|e| anyhow!("creating the wasm engine: {e:#}"))?;
    let artefact = engine
        .precompile_module(&bytes)
        .map_err(|e| anyhow!("compile error: {e:#}"))?;
    drop(bytes);
    let mut out = std::io::stdout().lock();
    out.write_all(&artefact)
        .and_then(|()| out.flush())
        .map_err(|e| anyhow!("writing the compiled module: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_artefact_cap_follows_the_module_size_up_to_a_ceiling() {
        assert_eq!(artefact_cap(0), ARTEFACT_SLACK);
        assert_eq!(artefact_cap(1000), 64_000 + ARTEFACT_SLACK);
        assert_eq!(artefact_cap(100 * 1024 * 1024), ARTEFACT_MAX);
        assert_eq!(artefact_cap(usize::MAX), ARTEFACT_MAX);
    }
}
