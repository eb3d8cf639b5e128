//! The `env.proxy_*` host functions (wasm32 only) and `WasmHost`, the
//! [`Host`] implementation over them.
//!
//! This is the only place the SDK hands pointers to the host. Memory the host
//! returns (header maps, buffers, properties) was allocated by the host through
//! our `proxy_on_memory_allocate` export as a `Vec<u8>` of exactly the returned
//! length, so it is taken back with `Vec::from_raw_parts(ptr, len, len)`.
#![allow(unsafe_code)]

use super::{serialize_pairs, BufferType, MapType, MetricType, Status, StreamType};
use crate::host::{Host, Pairs};
use crate::log::Level;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, buf_len: usize) -> u16;
}

fn check(code: u32) -> Result<(), Status> {
    match Status::from_code(code) {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

/// Takes ownership of host-written memory (see module docs).
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the host wrote `ptr`/`len` after allocating exactly `len` bytes
    // through `proxy_on_memory_allocate`, which leaks a `Vec<u8>` with capacity
    // `len`; nobody else holds the allocation.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// The real host: every method is one `env.proxy_*` call.
pub(crate) struct WasmHost;

impl Host for WasmHost {
    fn log(&self, level: Level, message: &str) {
        // SAFETY: pointer/length of a live &str.
        let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
    }

    fn now_nanos(&self) -> u64 {
        let mut t = 0u64;
        // SAFETY: `t` is a valid u64 out-parameter.
        match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
            0 => t,
            _ => 0,
        }
    }

    fn random_fill(&self, buf: &mut [u8]) {
        // SAFETY: pointer/length of a live &mut [u8].
        let _ = unsafe { random_get(buf.as_mut_ptr(), buf.len()) };
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_set_tick_period_milliseconds(period) })
    }

    fn buffer(&self, which: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-parameters are valid locals.
        let st = unsafe { proxy_get_buffer_bytes(which as u32, start, max, &mut ptr, &mut len) };
        match Status::from_code(st) {
            Status::Ok => Ok(take(ptr, len)),
            Status::NotFound => Ok(Vec::new()),
            other => Err(other),
        }
    }

    fn set_buffer(
        &self,
        which: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status> {
        // SAFETY: pointer/length of a live slice.
        check(unsafe {
            proxy_set_buffer_bytes(which as u32, start, size, value.as_ptr(), value.len())
        })
    }

    fn map_pairs(&self, map: MapType) -> Result<Pairs, Status> {
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-parameters are valid locals.
        check(unsafe { proxy_get_header_map_pairs(map as u32, &mut ptr, &mut len) })?;
        Ok(super::deserialize_pairs(&take(ptr, len)))
    }

    fn set_map_pairs(&self, map: MapType, pairs: &[(&str, &str)]) -> Result<(), Status> {
        let bytes = serialize_pairs(pairs);
        // SAFETY: pointer/length of a live Vec.
        check(unsafe { proxy_set_header_map_pairs(map as u32, bytes.as_ptr(), bytes.len()) })
    }

    fn map_value(&self, map: MapType, key: &str) -> Result<Option<String>, Status> {
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: key is a live &str, out-parameters are valid locals.
        let st = unsafe {
            proxy_get_header_map_value(map as u32, key.as_ptr(), key.len(), &mut ptr, &mut len)
        };
        match Status::from_code(st) {
            Status::Ok => Ok(Some(String::from_utf8_lossy(&take(ptr, len)).into_owned())),
            Status::NotFound => Ok(None),
            other => Err(other),
        }
    }

    fn replace_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status> {
        // SAFETY: live &strs.
        check(unsafe {
            proxy_replace_header_map_value(
                map as u32,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn add_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status> {
        // SAFETY: live &strs.
        check(unsafe {
            proxy_add_header_map_value(
                map as u32,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn remove_map_value(&self, map: MapType, key: &str) -> Result<(), Status> {
        // SAFETY: live &str.
        check(unsafe { proxy_remove_header_map_value(map as u32, key.as_ptr(), key.len()) })
    }

    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: live slice, valid out-parameters.
        let st = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut ptr, &mut len) };
        match Status::from_code(st) {
            Status::Ok => Ok(Some(take(ptr, len))),
            Status::NotFound | Status::SerializationFailure | Status::InternalFailure => Ok(None),
            other => Err(other),
        }
    }

    fn set_property(&self, path: &[u8], value: &[u8]) -> Result<(), Status> {
        // SAFETY: live slices.
        check(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
    }

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), Status> {
        let headers = serialize_pairs(headers);
        // SAFETY: live slices.
        check(unsafe {
            proxy_send_local_response(
                status,
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        })
    }

    fn continue_stream(&self, stream: StreamType) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_continue_stream(stream as u32) })
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_set_effective_context(context_id) })
    }

    fn http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
        let headers = serialize_pairs(headers);
        let trailers = serialize_pairs(trailers);
        let mut token = 0u32;
        // SAFETY: live slices, valid out-parameter.
        check(unsafe {
            proxy_http_call(
                upstream.as_ptr(),
                upstream.len(),
                headers.as_ptr(),
                headers.len(),
                body.as_ptr(),
                body.len(),
                trailers.as_ptr(),
                trailers.len(),
                timeout_ms,
                &mut token,
            )
        })?;
        Ok(token)
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut id = 0u32;
        // SAFETY: live &str, valid out-parameter.
        check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_increment_metric(id, delta) })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_record_metric(id, value) })
    }

    fn metric(&self, id: u32) -> Result<u64, Status> {
        let mut v = 0u64;
        // SAFETY: valid out-parameter.
        check(unsafe { proxy_get_metric(id, &mut v) })?;
        Ok(v)
    }

    fn shared_data(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        let mut cas = 0u32;
        // SAFETY: live &str, valid out-parameters.
        let st =
            unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) };
        match Status::from_code(st) {
            Status::Ok => Ok(Some((take(ptr, len), cas))),
            Status::NotFound => Ok(None),
            other => Err(other),
        }
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        // SAFETY: live slices.
        check(unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        })
    }
}
