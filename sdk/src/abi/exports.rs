//! The `proxy_on_*` callbacks a Proxy-Wasm host calls (wasm32 only).
//!
//! Each export forwards to the module's one dispatcher (`runtime::Dispatch`),
//! created on first use by the `__wasp_sdk_create_dispatch` function that
//! [`crate::register!`] defines in the filter crate. If a module forgets
//! `register!`, that symbol stays an unresolved import and the host refuses
//! the module at link time with the symbol's name in the error.
//!
//! The dispatcher lives in a thread-local `RefCell`; the host never re-enters
//! the guest from inside a host call, so a borrow is never contended. If it
//! ever were, the callback answers CONTINUE/false instead of trapping.
#![allow(unsafe_code)]

use crate::runtime::Dispatch;
use std::cell::RefCell;

extern "Rust" {
    fn __wasp_sdk_create_dispatch() -> Box<dyn Dispatch>;
}

thread_local! {
    static DISPATCH: RefCell<Option<Box<dyn Dispatch>>> = const { RefCell::new(None) };
}

fn with<R>(default: R, f: impl FnOnce(&mut dyn Dispatch) -> R) -> R {
    DISPATCH.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return default;
        };
        // SAFETY: `register!` defines this function with exactly this
        // signature (`fn() -> Box<dyn Dispatch>`), and it has no preconditions.
        let d = slot.get_or_insert_with(|| unsafe { __wasp_sdk_create_dispatch() });
        f(d.as_mut())
    })
}

/// Marks the module as speaking Proxy-Wasm ABI v0.2.1. Never called.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates guest memory through this before copying data in.
/// Answers null (the spec's failure value) instead of trapping when the
/// allocation cannot be made.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::new();
    if buf.try_reserve_exact(size).is_err() {
        return std::ptr::null_mut();
    }
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    with((), |d| d.on_context_create(context_id, parent_context_id))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(context_id: u32, vm_config_size: usize) -> u32 {
    with(false, |d| d.on_vm_start(context_id, vm_config_size)) as u32
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(context_id: u32, config_size: usize) -> u32 {
    with(false, |d| d.on_configure(context_id, config_size)) as u32
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with((), |d| d.on_tick(context_id))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    with((), |d| {
        d.on_http_call_response(context_id, token, num_headers, body_size, num_trailers)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(context_id: u32, num_headers: usize, eos: u32) -> u32 {
    with(0, |d| {
        d.on_request_headers(context_id, num_headers, eos != 0)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, eos: u32) -> u32 {
    with(0, |d| d.on_request_body(context_id, body_size, eos != 0))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> u32 {
    with(0, |d| d.on_request_trailers(context_id, num_trailers))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(context_id: u32, num_headers: usize, eos: u32) -> u32 {
    with(0, |d| {
        d.on_response_headers(context_id, num_headers, eos != 0)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, eos: u32) -> u32 {
    with(0, |d| d.on_response_body(context_id, body_size, eos != 0))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> u32 {
    with(0, |d| d.on_response_trailers(context_id, num_trailers))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with((), |d| d.on_log(context_id))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
    with(true, |d| d.on_done(context_id)) as u32
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with((), |d| d.on_delete(context_id))
}
