//! The host-function table: every `env.proxy_*` import of the Proxy-Wasm
//! ABI v0.2.1 (plus the 0.1.0 names SDKs still import) and the WASI
//! preview1 functions, linked into a `Linker<Host>` once per module
//! generation (on the control thread); the functions themselves run on the
//! VM's worker thread inside a callback.
//!
//! Rules every host function here follows:
//! - answer only statuses the Rust SDK accepts for that call (it panics, and
//!   so traps, on anything else; see `shared/proxy-wasm-notes.md`);
//! - never call back into the guest except its allocator;
//! - a bad guest pointer is INVALID_MEMORY_ACCESS, never a host panic;
//! - what a guest asks the host to do or keep is bounded by the filter's
//!   `limits` ([`crate::filter::HostLimits`]), checked *before* copying or
//!   allocating: over a limit the guest gets a status the SDK accepts for
//!   that call, or (where the SDK accepts only OK and the call changes the
//!   request) the request fails by the filter's policy ([`fail_request`]);
//!   either way the event is counted and logged, rate-limited.
//!
//! Imports this table does not know are stubbed per module by
//! [`stub_unknown`]: WASI ones answer ENOSYS, `env` ones UNIMPLEMENTED (or
//! trap when called if they return no status).

pub(crate) mod buffers;
pub(crate) mod context;
pub(crate) mod foreign;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod http_call;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod properties;
pub(crate) mod shared_data;
pub(crate) mod shared_queue;
pub(crate) mod wasi;

use wasmtime::{Caller, ExternType, Linker, Module, Val, ValType};

use super::host::Host;
use super::metrics::Limit;

/// Proxy-Wasm status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

/// Counts `limit` for the filter and returns the error that fails the
/// current request by the filter's `fail` policy: for calls where the Rust
/// SDK accepts only OK, so no status could tell the guest "no".
pub(crate) fn fail_request(c: &Caller<'_, Host>, limit: Limit, detail: &str) -> wasmtime::Error {
    let p = &c.data().plugin;
    p.stats.limit_exceeded(&p.name, limit, detail);
    wasmtime::Error::msg(format!("over limits.{}: {detail}", limit.name()))
}

/// Counts `limit` for the filter (the guest gets a status, or the work is
/// trimmed) and logs it, rate-limited.
pub(crate) fn note_limit(c: &Caller<'_, Host>, limit: Limit, detail: &str) {
    let p = &c.data().plugin;
    p.stats.limit_exceeded(&p.name, limit, detail);
}

const ENV: &str = "env";
const WASI: &str = "wasi_snapshot_preview1";

type C<'a> = Caller<'a, Host>;
type R = wasmtime::Result<i32>;

/// Wraps a host function body returning `HostResult` into an i32 status.
macro_rules! host {
    ($l:ident, $name:literal, |$c:ident $(, $a:ident)*| $body:expr) => {
        $l.func_wrap(ENV, $name, |mut $c: C<'_> $(, $a: i32)*| -> R {
            let $c = &mut $c;
            $body.map(|s| s as i32)
        })?;
    };
}

/// Adds every host function to `l`.
pub(crate) fn link(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    // Tests prove that a host panic fails only its callback: this import
    // exists only in the crate's own test build.
    #[cfg(test)]
    l.func_wrap("env", "wasp_test_host_panic", || -> i32 {
        panic!("deliberate host panic (test import)")
    })?;
    host!(l, "proxy_log", |c, lv, p, n| context::log(c, lv, p, n));
    host!(l, "proxy_get_log_level", |c, o| context::get_log_level(
        c, o
    ));
    host!(l, "proxy_get_current_time_nanoseconds", |c, o| {
        context::current_time(c, o)
    });
    host!(l, "proxy_set_tick_period_milliseconds", |c, ms| {
        context::set_tick_period(c, ms)
    });
    host!(l, "proxy_get_buffer_bytes", |c, t, s, m, po, lo| {
        buffers::get(c, t, s, m, po, lo)
    });
    host!(
        l,
        "proxy_set_buffer_bytes",
        |c, t, s, z, p, n| buffers::set(c, t, s, z, p, n)
    );
    host!(
        l,
        "proxy_get_buffer_status",
        |c, t, so, fo| buffers::status(c, t, so, fo)
    );
    host!(l, "proxy_get_configuration", |c, po, lo| {
        buffers::get_configuration(c, po, lo)
    });
    host!(l, "proxy_get_header_map_pairs", |c, m, po, lo| {
        headers::get_pairs(c, m, po, lo)
    });
    host!(l, "proxy_set_header_map_pairs", |c, m, p, n| {
        headers::set_pairs(c, m, p, n)
    });
    host!(l, "proxy_get_header_map_size", |c, m, o| headers::get_size(
        c, m, o
    ));
    host!(l, "proxy_get_header_map_value", |c, m, kp, kl, po, lo| {
        headers::get_value(c, m, kp, kl, po, lo)
    });
    host!(l, "proxy_add_header_map_value", |c, m, kp, kl, vp, vl| {
        headers::add(c, m, kp, kl, vp, vl)
    });
    host!(
        l,
        "proxy_replace_header_map_value",
        |c, m, kp, kl, vp, vl| { headers::replace(c, m, kp, kl, vp, vl) }
    );
    host!(l, "proxy_remove_header_map_value", |c, m, kp, kl| {
        headers::remove(c, m, kp, kl)
    });
    host!(
        l,
        "proxy_get_property",
        |c, pp, pl, po, lo| properties::get(c, pp, pl, po, lo)
    );
    host!(
        l,
        "proxy_set_property",
        |c, pp, pl, vp, vl| properties::set(c, pp, pl, vp, vl)
    );
    host!(l, "proxy_get_shared_data", |c, kp, kl, po, lo, co| {
        shared_data::get(c, kp, kl, po, lo, co)
    });
    host!(l, "proxy_set_shared_data", |c, kp, kl, vp, vl, cas| {
        shared_data::set(c, kp, kl, vp, vl, cas)
    });
    host!(l, "proxy_continue_stream", |c, t| context::continue_stream(
        c, t
    ));
    host!(l, "proxy_close_stream", |c, t| context::close_stream(c, t));
    host!(l, "proxy_continue_request", |c| context::continue_stream(
        c, 0
    ));
    host!(l, "proxy_continue_response", |c| context::continue_stream(
        c, 1
    ));
    host!(
        l,
        "proxy_send_local_response",
        |c, st, dp, dl, bp, bl, hp, hl, g| {
            context::send_local_response(c, st, dp, dl, bp, bl, hp, hl, g)
        }
    );
    host!(l, "proxy_http_call", |c,
                                 up,
                                 ul,
                                 hp,
                                 hl,
                                 bp,
                                 bl,
                                 tp,
                                 tl,
                                 to,
                                 tok| {
        http_call::call(c, up, ul, hp, hl, bp, bl, tp, tl, to, tok)
    });
    host!(l, "proxy_get_status", |c, co, po, lo| context::get_status(
        c, co, po, lo
    ));
    host!(l, "proxy_set_effective_context", |c, ctx| {
        context::set_effective_context(c, ctx)
    });
    host!(l, "proxy_done", |c| context::done(c));
    host!(l, "proxy_define_metric", |c, t, np, nl, o| metrics::define(
        c, t, np, nl, o
    ));
    host!(l, "proxy_get_metric", |c, id, o| metrics::get(c, id, o));
    l.func_wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, by: i64| -> R {
            metrics::increment(&mut c, id, by).map(|s| s as i32)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, v: i64| -> R { metrics::record(&mut c, id, v).map(|s| s as i32) },
    )?;

    host!(l, "proxy_register_shared_queue", |c, np, nl, o| {
        shared_queue::register(c, np, nl, o)
    });
    host!(l, "proxy_resolve_shared_queue", |c, vp, vl, np, nl, o| {
        shared_queue::resolve(c, vp, vl, np, nl, o)
    });
    host!(l, "proxy_enqueue_shared_queue", |c, id, vp, vl| {
        shared_queue::enqueue(c, id, vp, vl)
    });
    host!(l, "proxy_dequeue_shared_queue", |c, id, po, lo| {
        shared_queue::dequeue(c, id, po, lo)
    });

    host!(l, "proxy_grpc_call", |c,
                                 up,
                                 ul,
                                 sp,
                                 sl,
                                 mp,
                                 ml,
                                 hp,
                                 hl,
                                 bp,
                                 bl,
                                 to,
                                 tok| {
        grpc::call(c, up, ul, sp, sl, mp, ml, hp, hl, bp, bl, to, tok)
    });
    host!(
        l,
        "proxy_grpc_stream",
        |c, up, ul, sp, sl, mp, ml, hp, hl, tok| {
            grpc::stream(c, up, ul, sp, sl, mp, ml, hp, hl, tok)
        }
    );
    host!(l, "proxy_grpc_send", |c, t, p, n, e| grpc::send(
        c, t, p, n, e
    ));
    host!(l, "proxy_grpc_cancel", |c, t| grpc::cancel(c, t));
    host!(l, "proxy_grpc_close", |c, t| grpc::close(c, t));

    host!(
        l,
        "proxy_call_foreign_function",
        |c, np, nl, ap, al, po, lo| foreign::call(c, np, nl, ap, al, po, lo)
    );

    // WASI preview1.
    l.func_wrap(
        WASI,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, out: i32| {
            wasi::fd_write(&mut c, fd, iovs, n, out)
        },
    )?;
    l.func_wrap(WASI, "environ_sizes_get", |mut c: C<'_>, a: i32, b: i32| {
        wasi::sizes_get(&mut c, a, b)
    })?;
    l.func_wrap(WASI, "args_sizes_get", |mut c: C<'_>, a: i32, b: i32| {
        wasi::sizes_get(&mut c, a, b)
    })?;
    l.func_wrap(WASI, "environ_get", |mut c: C<'_>, a: i32, b: i32| {
        wasi::list_get(&mut c, a, b)
    })?;
    l.func_wrap(WASI, "args_get", |mut c: C<'_>, a: i32, b: i32| {
        wasi::list_get(&mut c, a, b)
    })?;
    l.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: C<'_>, id: i32, p: i64, out: i32| wasi::clock_time_get(&mut c, id, p, out),
    )?;
    l.func_wrap(WASI, "clock_res_get", |mut c: C<'_>, id: i32, out: i32| {
        wasi::clock_res_get(&mut c, id, out)
    })?;
    l.func_wrap(WASI, "random_get", |mut c: C<'_>, p: i32, n: i32| {
        wasi::random_get(&mut c, p, n)
    })?;
    l.func_wrap(
        WASI,
        "proc_exit",
        |mut c: C<'_>, code: i32| -> wasmtime::Result<()> { Err(wasi::proc_exit(&mut c, code)) },
    )?;
    l.func_wrap(WASI, "sched_yield", |mut c: C<'_>| {
        wasi::sched_yield(&mut c)
    })?;
    // No file descriptors beyond stdio and no preopens: EBADF, as wasi-libc expects.
    l.func_wrap(WASI, "fd_prestat_get", |_c: C<'_>, _fd: i32, _buf: i32| {
        wasi::EBADF
    })?;
    l.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: i32, _p: i32, _n: i32| wasi::EBADF,
    )?;
    l.func_wrap(WASI, "fd_close", |_c: C<'_>, _fd: i32| wasi::EBADF)?;
    l.func_wrap(
        WASI,
        "fd_read",
        |_c: C<'_>, _fd: i32, _i: i32, _n: i32, _o: i32| wasi::EBADF,
    )?;
    l.func_wrap(
        WASI,
        "fd_seek",
        |_c: C<'_>, _fd: i32, _off: i64, _wh: i32, _o: i32| wasi::EBADF,
    )?;
    l.func_wrap(WASI, "fd_fdstat_get", |mut c: C<'_>, fd: i32, out: i32| {
        wasi::fd_fdstat_get(&mut c, fd, out)
    })?;
    Ok(())
}

/// Defines every import of `module` that `l` lacks: WASI functions answer
/// ENOSYS, `env` functions UNIMPLEMENTED; imports with other result shapes
/// (or other modules' imports) trap only when called.
pub(crate) fn stub_unknown(l: &mut Linker<Host>, module: &Module) -> wasmtime::Result<()> {
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let results: Vec<ValType> = ty.results().collect();
        let answer = match (import.module(), results.as_slice()) {
            (WASI, [ValType::I32]) => Some(wasi::ENOSYS),
            (ENV, [ValType::I32]) => Some(Status::Unimplemented as i32),
            _ => None,
        };
        let (module_name, name) = (import.module().to_string(), import.name().to_string());
        // Already-linked names fail to redefine (no shadowing): that is the skip.
        let _ = l.func_new(
            import.module(),
            import.name(),
            ty.clone(),
            move |_c, _params, results| match answer {
                Some(v) => {
                    if let Some(r) = results.first_mut() {
                        *r = Val::I32(v);
                    }
                    Ok(())
                }
                None => Err(wasmtime::Error::msg(format!(
                    "called unimplemented import {module_name}.{name}"
                ))),
            },
        );
    }
    Ok(())
}
