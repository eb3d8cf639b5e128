//! Guest memory access for host functions: bounds-checked reads, writes of
//! out-parameters, and copying host bytes into memory the guest allocates.
//!
//! Runs inside a host call on the VM's thread. Every guest pointer is checked
//! against the current memory size; a bad pointer answers
//! INVALID_MEMORY_ACCESS instead of touching anything. No `unsafe` here:
//! wasmtime hands out the linear memory as a slice.

use wasmtime::{Caller, Memory};

use super::Status;
use crate::filter::host::Host;

/// Result of a host function body: a status, or a trap for the guest.
pub(crate) type HostResult = wasmtime::Result<Status>;

fn memory(caller: &Caller<'_, Host>) -> Result<Memory, Status> {
    caller.data().memory.ok_or(Status::InternalFailure)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(crate) fn read(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller)?;
    let data = mem.data(&*caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

/// Copies `len` bytes at `ptr` out of guest memory if `len <= max`;
/// `Ok(None)` (nothing copied) if the range is valid but longer than `max`.
pub(crate) fn read_at_most(
    caller: &mut Caller<'_, Host>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<Option<Vec<u8>>, Status> {
    if len as u32 as usize > max {
        return check(caller, ptr, len).map(|()| None);
    }
    read(caller, ptr, len).map(Some)
}

/// Reads a UTF-8 string (lossy) from guest memory.
pub(crate) fn read_str(
    caller: &mut Caller<'_, Host>,
    ptr: i32,
    len: i32,
) -> Result<String, Status> {
    read(caller, ptr, len).map(|b| match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Writes `bytes` at `ptr`.
pub(crate) fn write(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller)?;
    let data = mem.data_mut(&mut *caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    let dst = data
        .get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?;
    dst.copy_from_slice(bytes);
    Ok(())
}

/// Checks that `[ptr, ptr+len)` lies in guest memory, without copying.
pub(crate) fn check(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Result<(), Status> {
    slice_mut(caller, ptr, len).map(|_| ())
}

/// The guest memory range `[ptr, ptr+len)`, writable in place.
pub(crate) fn slice_mut<'a>(
    caller: &'a mut Caller<'_, Host>,
    ptr: i32,
    len: i32,
) -> Result<&'a mut [u8], Status> {
    let mem = memory(caller)?;
    let data = mem.data_mut(caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get_mut(start..end).ok_or(Status::InvalidMemoryAccess)
}

pub(crate) fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, v: u32) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(caller: &mut Caller<'_, Host>, ptr: i32, v: u64) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Allocates guest memory with the guest's allocator and copies `bytes` into
/// it, writing the pointer and length to the out-parameters. Empty data is
/// returned as a null pointer with length 0. A trap in the allocator
/// propagates as `Err` (the VM fails).
pub(crate) fn copy_out(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ptr_out: i32,
    len_out: i32,
) -> HostResult {
    copy_out_with(caller, bytes.len(), ptr_out, len_out, |_, dst| {
        dst.copy_from_slice(bytes)
    })
}

/// [`copy_out`] of `len` bytes that `fill` writes straight from host state
/// into the guest's new allocation (`dst.len() == len`), so a window of a
/// large host buffer is copied once and nothing else is.
pub(crate) fn copy_out_with(
    caller: &mut Caller<'_, Host>,
    len: usize,
    ptr_out: i32,
    len_out: i32,
    fill: impl FnOnce(&Host, &mut [u8]),
) -> HostResult {
    let Ok(len32) = u32::try_from(len) else {
        return Ok(Status::InternalFailure);
    };
    let guest_ptr = if len == 0 {
        0
    } else {
        let Some(alloc) = caller.data().alloc.clone() else {
            return Ok(Status::InternalFailure);
        };
        let p = alloc.call(&mut *caller, len32)?;
        if p == 0 {
            return Ok(Status::InternalFailure);
        }
        let Ok(mem) = memory(caller) else {
            return Ok(Status::InternalFailure);
        };
        let (data, host) = mem.data_and_store_mut(&mut *caller);
        let start = p as usize;
        let Some(dst) = start
            .checked_add(len)
            .and_then(|end| data.get_mut(start..end))
        else {
            return Ok(Status::InvalidMemoryAccess);
        };
        fill(host, dst);
        host.plugin.stats.copied_to_guest(len);
        p
    };
    if let Err(s) = write_u32(caller, ptr_out, guest_ptr) {
        return Ok(s);
    }
    if let Err(s) = write_u32(caller, len_out, len32) {
        return Ok(s);
    }
    Ok(Status::Ok)
}
