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

/// Appends to the fd's line buffer; logs each complete line.
fn emit(c: &mut Caller<'_, Host>, fd: usize, bytes: &[u8]) {
    let h = c.data_mut();
    let buf = &mut h.out_lines[fd];
    buf.extend_from_slice(bytes);
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let filter = &*h.plugin.name;
        if fd == 0 {
            tracing::info!(target: "wasp::filter::stdout", filter, "{text}");
        } else {
            tracing::error!(target: "wasp::filter::stderr", filter, "{text}");
        }
    }
    if buf.len() > 16 << 10 {
        let text = String::from_utf8_lossy(buf).into_owned();
        buf.clear();
        tracing::info!(target: "wasp::filter::stdout", filter = %h.plugin.name, "{text}");
    }
}

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
    let mut total: u32 = 0;
    for i in 0..iovs_len.max(0) {
        let Ok(iov) = memory::read(c, iovs.wrapping_add(i.wrapping_mul(8)), 8) else {
            return EFAULT;
        };
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        let Ok(bytes) = memory::read(c, ptr, len) else {
            return EFAULT;
        };
        total = total.wrapping_add(bytes.len() as u32);
        emit(c, slot, &bytes);
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
