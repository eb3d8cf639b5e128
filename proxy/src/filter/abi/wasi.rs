//! The WASI preview1 functions a Proxy-Wasm guest needs, implemented here
//! rather than with wasmtime-wasi: stdout/stderr go to the proxy's log
//! (tagged with the filter name), the environment and arguments are empty
//! (never the proxy's own), clocks are real, `random_get` is the OS CSPRNG,
//! `proc_exit` fails the VM (never the proxy). Anything else answers ENOSYS
//! (see `abi::stub_unknown`), so a filter cannot open files or sockets.
//!
//! Runs inside a host call on the VM's thread.

use std::time::Instant;

use rand::RngCore;
use wasmtime::Caller;

use super::context::charge_log;
use super::memory;
use crate::filter::host::{Host, ProcExit};

/// WASI errno values.
pub(crate) const ESUCCESS: i32 = 0;
pub(crate) const EBADF: i32 = 8;
pub(crate) const EFAULT: i32 = 21;
pub(crate) const EINVAL: i32 = 28;
pub(crate) const ENOSYS: i32 = 52;
pub(crate) const ENOTSUP: i32 = 58;

fn errno(r: Result<(), super::Status>) -> i32 {
    match r {
        Ok(()) => ESUCCESS,
        Err(_) => EFAULT,
    }
}

/// Longest partial line kept between writes; a longer one is logged as is.
const MAX_PENDING_LINE: usize = 16 << 10;

/// Iovecs one `fd_write` looks at (Linux's `IOV_MAX`): past them the write
/// is short, which callers of `writev` handle by writing the rest again.
pub(crate) const MAX_IOVECS: usize = 1024;

fn log_line(filter: &str, fd: usize, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    if fd == 0 {
        tracing::info!(target: "wasp::filter::stdout", filter, "{text}");
    } else {
        tracing::error!(target: "wasp::filter::stderr", filter, "{text}");
    }
}

/// Logs each complete line of `bytes` (after the fd's pending partial
/// line), within the callback's log budget. One pass over `bytes`: each
/// byte is looked at once, whatever the number of lines.
fn emit(c: &mut Caller<'_, Host>, fd: usize, bytes: &[u8]) {
    let mut rest = bytes;
    while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
        let (line, tail) = rest.split_at(pos);
        rest = tail.get(1..).unwrap_or_default();
        let pending = std::mem::take(&mut c.data_mut().out_lines[fd]);
        if charge_log(c, pending.len().saturating_add(line.len())) {
            let filter = c.data().plugin.name.clone();
            if pending.is_empty() {
                log_line(&filter, fd, line);
            } else {
                let mut whole = pending;
                whole.extend_from_slice(line);
                log_line(&filter, fd, &whole);
            }
        }
    }
    if rest.is_empty() {
        return;
    }
    let h = c.data_mut();
    let room = MAX_PENDING_LINE.saturating_sub(h.out_lines[fd].len());
    let keep = rest.get(..room.min(rest.len())).unwrap_or_default();
    h.out_lines[fd].extend_from_slice(keep);
    if h.out_lines[fd].len() >= MAX_PENDING_LINE {
        let line = std::mem::take(&mut h.out_lines[fd]);
        if charge_log(c, line.len()) {
            let filter = c.data().plugin.name.clone();
            log_line(&filter, fd, &line);
        }
    }
}

/// `fd_write` to stdout/stderr: the bytes go to the proxy's log within the
/// callback's `limits.log_bytes` (the rest is dropped but reported as
/// written, so the guest does not retry); nothing is copied out of guest
/// memory past the budget, and at most [`MAX_IOVECS`] iovecs are read.
pub(crate) fn fd_write(
    c: &mut Caller<'_, Host>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> i32 {
    let slot = match fd {
        1 => 0,
        2 => 1,
        _ => return EBADF,
    };
    let n = usize::try_from(iovs_len).unwrap_or(0).min(MAX_IOVECS);
    let mut total: u32 = 0;
    for i in 0..n {
        let at = (iovs as u32).wrapping_add((i as u32).wrapping_mul(8));
        let Ok(iov) = memory::read(c, at as i32, 8) else {
            return EFAULT;
        };
        let word = |r: std::ops::Range<usize>| -> i32 {
            iov.get(r)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, i32::from_le_bytes)
        };
        let (ptr, len) = (word(0..4), word(4..8));
        if memory::check(c, ptr, len).is_err() {
            return EFAULT;
        }
        let len = len as u32;
        let Some(next) = total.checked_add(len) else {
            // A short write: the guest writes the rest again.
            break;
        };
        total = next;
        let over = c.data().actions.log_bytes > c.data().plugin.limits.log_bytes;
        if over || len == 0 {
            continue;
        }
        let budget = c
            .data()
            .plugin
            .limits
            .log_bytes
            .saturating_sub(c.data().actions.log_bytes);
        // Copy at most what could still be logged, plus one byte so a
        // line that does not fit is still seen (and counted) as too long.
        let take = (len as usize).min(budget.saturating_add(1));
        let Ok(bytes) = memory::read(c, ptr, take as i32) else {
            return EFAULT;
        };
        emit(c, slot, &bytes);
        if take < len as usize {
            // The rest of this write is dropped: so is its partial line.
            charge_log(c, usize::MAX);
            c.data_mut().out_lines[slot].clear();
        }
    }
    errno(memory::write_u32(c, nwritten, total))
}

/// `environ_sizes_get` / `args_sizes_get`: zero entries, zero bytes.
pub(crate) fn sizes_get(c: &mut Caller<'_, Host>, count_out: i32, size_out: i32) -> i32 {
    let r = memory::write_u32(c, count_out, 0).and_then(|()| memory::write_u32(c, size_out, 0));
    errno(r)
}

/// `environ_get` / `args_get`: nothing to write.
pub(crate) fn list_get(_c: &mut Caller<'_, Host>, _ptrs: i32, _buf: i32) -> i32 {
    ESUCCESS
}

thread_local! {
    static MONO_BASE: Instant = Instant::now();
}

pub(crate) fn clock_time_get(c: &mut Caller<'_, Host>, id: i32, _precision: i64, out: i32) -> i32 {
    let ns = match id {
        0 => super::context::now_nanos(),
        1..=3 => MONO_BASE.with(|b| b.elapsed().as_nanos() as u64),
        _ => return ENOTSUP,
    };
    errno(memory::write_u64(c, out, ns))
}

pub(crate) fn clock_res_get(c: &mut Caller<'_, Host>, id: i32, out: i32) -> i32 {
    if !(0..=3).contains(&id) {
        return EINVAL;
    }
    errno(memory::write_u64(c, out, 1_000))
}

pub(crate) fn random_get(c: &mut Caller<'_, Host>, buf: i32, len: i32) -> i32 {
    // Fill guest memory in place: a huge `len` can never make the host allocate.
    match memory::slice_mut(c, buf, len) {
        Ok(dst) => {
            rand::rngs::OsRng.fill_bytes(dst);
            ESUCCESS
        }
        Err(_) => EFAULT,
    }
}

pub(crate) fn proc_exit(_c: &mut Caller<'_, Host>, code: i32) -> wasmtime::Error {
    wasmtime::Error::new(ProcExit(code))
}

pub(crate) fn sched_yield(_c: &mut Caller<'_, Host>) -> i32 {
    ESUCCESS
}

/// `fd_fdstat_get` on stdout/stderr: a character device, no rights needed.
pub(crate) fn fd_fdstat_get(c: &mut Caller<'_, Host>, fd: i32, out: i32) -> i32 {
    if !(0..=2).contains(&fd) {
        return EBADF;
    }
    // filetype u8 (2 = character device), flags u16, rights_base u64, rights_inheriting u64.
    let mut stat = [0u8; 24];
    stat[0] = 2;
    errno(memory::write(c, out, &stat))
}
