//! ABI edge cases with hand-written guest modules (WAT): what SDK-built
//! fixtures never do on purpose: bad guest pointers, unknown imports, the
//! 0.2.0 version marker with `_start` and `malloc`, `proc_exit` during
//! start-up, missing exports, an initial memory over the cap; windowed
//! body reads, body growth past `max_body_bytes`, and seeded random
//! arguments to every host function (no host panic, whatever they are).

use std::path::PathBuf;
use std::sync::Arc;

use http::Request;

use super::*;

struct NoCallouts;

impl HttpCallouts for NoCallouts {
    fn call(
        &self,
        _cluster: &str,
        _req: Request<bytes::Bytes>,
        _timeout: std::time::Duration,
    ) -> Option<CalloutFuture> {
        None
    }
}

fn runtime() -> Arc<FilterRuntime> {
    FilterRuntime::new(None, Arc::new(NoCallouts)).unwrap()
}

/// Writes `wat` as a `.wasm` file and returns a spec for it.
fn module(name: &str, wat: &str) -> FilterSpec {
    let bytes = wat::parse_str(wat).unwrap();
    let dir = std::env::temp_dir().join(format!("wasp-abi-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    FilterSpec::new(name, path)
}

fn info() -> StreamInfo {
    StreamInfo {
        listener: Arc::from("l"),
        source: "127.0.0.1:1".parse().unwrap(),
        destination: "127.0.0.1:2".parse().unwrap(),
        scheme: "http",
        protocol: "HTTP/1.1",
        request_id: Arc::from("id"),
        start: std::time::SystemTime::now(),
        principal: None,
        tls: None,
    }
}

/// Common head of the modules: version 0.2.0, `_start`, a bump `malloc`.
const PRELUDE: &str = r#"
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
"#;

const EDGE: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $setbuf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_made_up_call" (func $unknown (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $envsz (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $rand (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  PRELUDE
  (global $started (mut i32) (i32.const 0))
  (data (i32.const 100) "x-edge")
  (data (i32.const 110) "x-path")
  (data (i32.const 200) "ok")
  (data (i32.const 300) "request\00path")
  (data (i32.const 400) "hello from wat\n")
  (func (export "_start") (global.set $started (i32.const 1)))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (global.get $started))
  (func $check (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; Bad guest pointers answer INVALID_MEMORY_ACCESS, never crash the host.
    (call $check (call $log (i32.const 2) (i32.const 0xfffffff0) (i32.const 100)) (i32.const 6))
    (call $check (call $pairs (i32.const 0) (i32.const 0x7ffffff0) (i32.const 8)) (i32.const 6))
    (call $check (call $setbuf (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0xfffffff0) (i32.const 64)) (i32.const 6))
    ;; A missing header is NOT_FOUND.
    (call $check (call $value (i32.const 0) (i32.const 100) (i32.const 6)
      (i32.const 16) (i32.const 20)) (i32.const 1))
    ;; request.path is found and copied into memory from our malloc.
    (call $check (call $prop (i32.const 300) (i32.const 12) (i32.const 16) (i32.const 20))
      (i32.const 0))
    (call $check (call $add (i32.const 0) (i32.const 110) (i32.const 6)
      (i32.load (i32.const 16)) (i32.load (i32.const 20))) (i32.const 0))
    ;; Unknown imports are linked: env answers UNIMPLEMENTED, WASI ENOSYS.
    (call $check (call $unknown (i32.const 1)) (i32.const 12))
    (call $check (call $open (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 0)) (i32.const 52))
    ;; The environment is empty.
    (i32.store (i32.const 24) (i32.const 99))
    (call $check (call $envsz (i32.const 24) (i32.const 28)) (i32.const 0))
    (call $check (i32.load (i32.const 24)) (i32.const 0))
    ;; random_get: EFAULT out of bounds, SUCCESS in bounds.
    (call $check (call $rand (i32.const 0xfffffff0) (i32.const 64)) (i32.const 21))
    (call $check (call $rand (i32.const 512) (i32.const 32)) (i32.const 0))
    ;; stdout goes to the log; fd 5 does not exist.
    (i32.store (i32.const 32) (i32.const 400))
    (i32.store (i32.const 36) (i32.const 15))
    (call $check (call $write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40))
      (i32.const 0))
    (call $check (i32.load (i32.const 40)) (i32.const 15))
    (call $check (call $write (i32.const 5) (i32.const 32) (i32.const 1) (i32.const 40))
      (i32.const 8))
    (call $check (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 200)
      (i32.const 2)) (i32.const 0))
    (i32.const 0))
)
"#;

#[tokio::test]
async fn hostile_pointers_and_unknown_imports() {
    let rt = runtime();
    let set = rt
        .load(vec![module("edge", &EDGE.replace("PRELUDE", PRELUDE))])
        .unwrap();
    let mut s = set.stream(&[Arc::from("edge")], info());
    let mut req = Request::get("/p?q").body(()).unwrap().into_parts().0;
    match s.request_headers(&mut req, true).await {
        Verdict::Continue => {}
        Verdict::Respond(r) => panic!("guest check failed: {:?}", r.body()),
        Verdict::Wait => panic!("a header phase never waits"),
    }
    assert_eq!(req.headers.get("x-edge").unwrap(), "ok");
    assert_eq!(req.headers.get("x-path").unwrap(), "/p?q");
    s.finish(0, 0);
}

/// Panics in the host (a stand-in for a wasp bug a guest could reach)
/// when a request has more than 6 header entries.
const HOST_PANIC: &str = r#"
(module
  (import "env" "wasp_test_host_panic" (func $panic (result i32)))
  PRELUDE
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.gt_u (local.get 1) (i32.const 6)) (then (drop (call $panic))))
    (i32.const 0))
)
"#;

#[tokio::test]
async fn a_host_panic_fails_only_its_own_request() {
    let rt = runtime();
    let set = rt
        .load(vec![module(
            "host-panic",
            &HOST_PANIC.replace("PRELUDE", PRELUDE),
        )])
        .unwrap();
    let names = [Arc::from("host-panic")];
    let mut clean = set.stream(&names, info());
    let mut head = Request::get("/").body(()).unwrap().into_parts().0;
    assert!(matches!(
        clean.request_headers(&mut head, true).await,
        Verdict::Continue
    ));

    let mut poisoned = set.stream(&names, info());
    let mut head = Request::get("/")
        .header("a", "1")
        .header("b", "2")
        .header("c", "3")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    match poisoned.request_headers(&mut head, true).await {
        Verdict::Respond(r) => {
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()["x-wasp-error"], "filter_failed");
            let body = String::from_utf8_lossy(r.body()).into_owned();
            assert!(body.contains("host panic"), "{body}");
        }
        Verdict::Continue | Verdict::Wait => panic!("the panicking callback was not failed"),
    }
    poisoned.finish(0, 0);

    // The stream already in flight and a new one both carry on.
    let mut resp = http::Response::new(()).into_parts().0;
    assert!(matches!(
        clean.response_headers(&mut resp, true).await,
        Verdict::Continue
    ));
    clean.finish(0, 0);
    let mut next = set.stream(&names, info());
    let mut head = Request::get("/").body(()).unwrap().into_parts().0;
    assert!(matches!(
        next.request_headers(&mut head, true).await,
        Verdict::Continue
    ));
    next.finish(0, 0);
}

fn start_module(start_body: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  {PRELUDE}
  (func (export "_start") {start_body}))"#
    )
}

#[test]
fn proc_exit_zero_in_start_is_success_nonzero_fails() {
    let rt = runtime();
    rt.load(vec![module(
        "exit0",
        &start_module("(call $exit (i32.const 0))"),
    )])
    .unwrap();
    let err = rt
        .load(vec![module(
            "exit1",
            &start_module("(call $exit (i32.const 1))"),
        )])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "filter \"exit1\": proc_exit(1)");
}

#[test]
fn missing_exports_are_named() {
    let rt = runtime();
    let no_create = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0)))"#;
    let err = rt
        .load(vec![module("no-create", no_create)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("filter \"no-create\"") && err.contains("proxy_on_context_create"),
        "{err}"
    );
    let no_alloc = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32)))"#;
    let err = rt
        .load(vec![module("no-alloc", no_alloc)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_on_memory_allocate"), "{err}");
}

#[test]
fn initial_memory_over_the_cap_is_rejected() {
    let rt = runtime();
    let big = PRELUDE.replace(
        r#"(memory (export "memory") 1)"#,
        r#"(memory (export "memory") 256)"#,
    );
    let mut spec = module("big", &format!("(module {big})"));
    spec.memory_limit = 8 << 20;
    let err = rt.load(vec![spec]).unwrap_err().to_string();
    assert!(
        err.contains("filter \"big\"") && err.contains("memory"),
        "{err}"
    );
}

#[test]
fn a_loop_in_configure_fails_the_load_within_the_start_deadline() {
    let rt = runtime();
    let wat = format!(
        r#"(module {PRELUDE}
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (loop $l (br $l)) (i32.const 1)))"#
    );
    let started = std::time::Instant::now();
    let err = rt.load(vec![module("spin", &wat)]).unwrap_err().to_string();
    assert_eq!(err, "filter \"spin\": CPU deadline exceeded");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A guest that reads three 64 KiB windows and the last 1000 bytes of a
/// 4 MiB body, and checks the first byte of each window.
const WINDOWS: &str = r#"
(module
  (import "env" "proxy_get_buffer_bytes"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 16)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $check (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func $window (param $start i32) (param $max i32) (param $len i32)
    (call $check (call $get (i32.const 0) (local.get $start) (local.get $max)
      (i32.const 16) (i32.const 20)) (i32.const 0))
    (call $check (i32.load (i32.const 20)) (local.get $len))
    ;; byte i of the body is i mod 251
    (call $check (i32.load8_u (i32.load (i32.const 16)))
      (i32.rem_u (local.get $start) (i32.const 251))))
  (func (export "proxy_on_request_body") (param i32) (param $size i32) (param i32) (result i32)
    (call $window (i32.const 0) (i32.const 65536) (i32.const 65536))
    (call $window (i32.const 1048576) (i32.const 65536) (i32.const 65536))
    (call $window (i32.const 2097152) (i32.const 65536) (i32.const 65536))
    ;; A window past the end is clamped: 1000 bytes.
    (call $window (i32.sub (local.get $size) (i32.const 1000)) (i32.const -1) (i32.const 1000))
    (i32.const 0))
)
"#;

#[tokio::test]
async fn get_buffer_bytes_copies_only_the_window() {
    let rt = runtime();
    let set = rt.load(vec![module("window", WINDOWS)]).unwrap();
    let mut s = set.stream(&[Arc::from("window")], info());
    let mut req = Request::post("/").body(()).unwrap().into_parts().0;
    assert!(matches!(
        s.request_headers(&mut req, false).await,
        Verdict::Continue
    ));
    let body: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    match s.request_body(bytes::Bytes::from(body), true) {
        BodyVerdict::Forward(b) => assert_eq!(b.len(), 4 << 20),
        other => panic!("guest check failed: {other:?}"),
    }
    s.finish(0, 0);
    let copied = rt.stats_of("window").unwrap().copied_to_guest_total();
    assert_eq!(copied, 3 * 65536 + 1000);
}

/// Every host function the table links, with its parameter types.
const HOST_CALLS: &[(&str, &str, &str)] = &[
    ("env", "proxy_log", "i32 i32 i32"),
    ("env", "proxy_get_log_level", "i32"),
    ("env", "proxy_get_current_time_nanoseconds", "i32"),
    ("env", "proxy_set_tick_period_milliseconds", "i32"),
    ("env", "proxy_get_buffer_bytes", "i32 i32 i32 i32 i32"),
    ("env", "proxy_set_buffer_bytes", "i32 i32 i32 i32 i32"),
    ("env", "proxy_get_buffer_status", "i32 i32 i32"),
    ("env", "proxy_get_configuration", "i32 i32"),
    ("env", "proxy_get_header_map_pairs", "i32 i32 i32"),
    ("env", "proxy_set_header_map_pairs", "i32 i32 i32"),
    ("env", "proxy_get_header_map_size", "i32 i32"),
    ("env", "proxy_get_header_map_value", "i32 i32 i32 i32 i32"),
    ("env", "proxy_add_header_map_value", "i32 i32 i32 i32 i32"),
    (
        "env",
        "proxy_replace_header_map_value",
        "i32 i32 i32 i32 i32",
    ),
    ("env", "proxy_remove_header_map_value", "i32 i32 i32"),
    ("env", "proxy_get_property", "i32 i32 i32 i32"),
    ("env", "proxy_set_property", "i32 i32 i32 i32"),
    ("env", "proxy_get_shared_data", "i32 i32 i32 i32 i32"),
    ("env", "proxy_set_shared_data", "i32 i32 i32 i32 i32"),
    ("env", "proxy_continue_stream", "i32"),
    ("env", "proxy_close_stream", "i32"),
    (
        "env",
        "proxy_send_local_response",
        "i32 i32 i32 i32 i32 i32 i32 i32",
    ),
    (
        "env",
        "proxy_http_call",
        "i32 i32 i32 i32 i32 i32 i32 i32 i32 i32",
    ),
    ("env", "proxy_get_status", "i32 i32 i32"),
    ("env", "proxy_set_effective_context", "i32"),
    ("env", "proxy_define_metric", "i32 i32 i32 i32"),
    ("env", "proxy_get_metric", "i32 i32"),
    ("env", "proxy_increment_metric", "i32 i64"),
    ("env", "proxy_record_metric", "i32 i64"),
    ("env", "proxy_register_shared_queue", "i32 i32 i32"),
    ("env", "proxy_resolve_shared_queue", "i32 i32 i32 i32 i32"),
    ("env", "proxy_enqueue_shared_queue", "i32 i32 i32"),
    ("env", "proxy_dequeue_shared_queue", "i32 i32 i32"),
    ("wasi_snapshot_preview1", "fd_write", "i32 i32 i32 i32"),
    ("wasi_snapshot_preview1", "environ_sizes_get", "i32 i32"),
    ("wasi_snapshot_preview1", "environ_get", "i32 i32"),
    ("wasi_snapshot_preview1", "clock_time_get", "i32 i64 i32"),
    ("wasi_snapshot_preview1", "clock_res_get", "i32 i32"),
    ("wasi_snapshot_preview1", "random_get", "i32 i32"),
    ("wasi_snapshot_preview1", "fd_fdstat_get", "i32 i32"),
];

/// A guest that calls every host function `rounds` times with arguments
/// from an xorshift generator seeded with `seed`: zero, small numbers,
/// pointers into (and just past) its two pages, huge and negative values.
fn fuzz_module(seed: u32, rounds: u32) -> String {
    let mut imports = String::new();
    let mut calls = String::new();
    for (i, (module, name, params)) in HOST_CALLS.iter().enumerate() {
        imports.push_str(&format!(
            "(import \"{module}\" \"{name}\" (func $f{i} (param {params}) (result i32)))\n"
        ));
        let args: String = params
            .split(' ')
            .map(|t| match t {
                "i64" => "(i64.extend_i32_s (call $r)) ",
                _ => "(call $r) ",
            })
            .collect();
        calls.push_str(&format!("(drop (call $f{i} {args}))\n"));
    }
    format!(
        r#"(module
  {imports}
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 1024))
  (global $s (mut i32) (i32.const {seed}))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    ;; A bump allocator that wraps within the two pages.
    (local.set $p (global.get $bump))
    (global.set $bump (i32.and (i32.add (global.get $bump) (local.get $n)) (i32.const 0xffff)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $next (result i32)
    (global.set $s (i32.xor (global.get $s) (i32.shl (global.get $s) (i32.const 13))))
    (global.set $s (i32.xor (global.get $s) (i32.shr_u (global.get $s) (i32.const 17))))
    (global.set $s (i32.xor (global.get $s) (i32.shl (global.get $s) (i32.const 5))))
    (global.get $s))
  (func $r (result i32) (local $x i32) (local $k i32)
    (local.set $x (call $next))
    (local.set $k (i32.and (local.get $x) (i32.const 7)))
    (if (i32.eqz (local.get $k)) (then (return (i32.const 0))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (i32.shr_u (local.get $x) (i32.const 24)))))
    (if (i32.eq (local.get $k) (i32.const 2))
      (then (return (i32.and (i32.shr_u (local.get $x) (i32.const 8)) (i32.const 0x1ffff)))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (i32.const 0x7fffffff))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (i32.const -1))))
    (if (i32.eq (local.get $k) (i32.const 5))
      (then (return (i32.sub (i32.const 0x20000) (i32.shr_u (local.get $x) (i32.const 20))))))
    (if (i32.eq (local.get $k) (i32.const 6)) (then (return (i32.shr_u (local.get $x) (i32.const 16)))))
    (local.get $x))
  (func $fuzz (local $i i32)
    (loop $l
      {calls}
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {rounds})))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $fuzz) (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $fuzz) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $fuzz) (i32.const 0))
)"#
    )
}

/// Arbitrary pointers, lengths and counts to every host function never
/// panic the host: each callback ends normally or fails the filter by its
/// policy (a limit, a trap), and the next stream runs again.
#[tokio::test]
async fn random_arguments_to_every_host_call_never_panic_the_host() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x005e_ed0f_f00d);
    let rt = runtime();
    for round in 0..12 {
        let seed: u32 = rng.gen::<u32>() | 1;
        let name = format!("fuzz{round}");
        let set = rt
            .load(vec![module(&name, &fuzz_module(seed, 30))])
            .unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
        for _ in 0..3 {
            let mut s = set.stream(&[Arc::from(name.as_str())], info());
            let mut req = Request::post("/p")
                .header("x-a", "1")
                .body(())
                .unwrap()
                .into_parts()
                .0;
            if let Verdict::Continue = s.request_headers(&mut req, false).await {
                let _ = s.request_body(bytes::Bytes::from(vec![b'b'; 70_000]), true);
                let mut resp = http::Response::new(()).into_parts().0;
                let _ = s.response_headers(&mut resp, true).await;
            }
            s.finish(1, 1);
        }
    }
}

/// A guest that appends 2000 bytes to every request body chunk.
const GROW: &str = r#"
(module
  (import "env" "proxy_set_buffer_bytes"
    (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 8192))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (drop (call $set (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1024) (i32.const 2000)))
    (i32.const 0))
)
"#;

#[tokio::test]
async fn a_body_rewritten_past_max_body_bytes_fails_by_policy() {
    let rt = runtime();
    let mut spec = module("grow", GROW);
    spec.max_body_bytes = 3000;
    let set = rt.load(vec![spec]).unwrap();
    let send = |n: usize| {
        let set = set.clone();
        async move {
            let mut s = set.stream(&[Arc::from("grow")], info());
            let mut req = Request::post("/").body(()).unwrap().into_parts().0;
            assert!(matches!(
                s.request_headers(&mut req, false).await,
                Verdict::Continue
            ));
            let v = s.request_body(bytes::Bytes::from(vec![b'x'; n]), true);
            s.finish(0, 0);
            v
        }
    };
    // 500 + 2000 fits in 3000.
    match send(500).await {
        BodyVerdict::Forward(b) => assert_eq!(b.len(), 2500),
        other => panic!("{other:?}"),
    }
    // 1500 + 2000 does not: the request fails (fail = closed), and only it.
    match send(1500).await {
        BodyVerdict::Respond(r) => {
            assert_eq!(r.status(), 503);
            let body = String::from_utf8_lossy(r.body()).to_string();
            assert!(body.contains("max_body_bytes"), "{body}");
        }
        other => panic!("{other:?}"),
    }
    match send(10).await {
        BodyVerdict::Forward(b) => assert_eq!(b.len(), 2010),
        other => panic!("{other:?}"),
    }
}

/// Ends a stream without `proxy_on_log` (and, in `NO_END`, without
/// `proxy_on_done` either): what the host runs in their place must not
/// time the next callback, or the instance's idle time, from the last
/// callback that did run.
const NO_LOG: &str = r#"
(module
  PRELUDE
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
)
"#;

const ONLY_DELETE: &str = r#"
(module
  PRELUDE
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_delete") (param i32))
)
"#;

const NO_END: &str = r#"
(module
  PRELUDE
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
)
"#;

/// A stream that lasts a while (the upstream is slow) between its request
/// headers and its end.
async fn slow_stream(set: &Arc<FilterSet>, names: &[&str]) {
    let pl: Vec<Arc<str>> = names.iter().map(|n| Arc::from(*n)).collect();
    let mut s = set.stream(&pl, info());
    let mut req = Request::get("/").body(()).unwrap().into_parts().0;
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.finish(0, 0);
}

#[tokio::test]
async fn end_callbacks_are_timed_from_their_own_start() {
    let rt = runtime();
    let set = rt
        .load(vec![
            module("nolog", &NO_LOG.replace("PRELUDE", PRELUDE)),
            module("onlydelete", &ONLY_DELETE.replace("PRELUDE", PRELUDE)),
        ])
        .unwrap();
    slow_stream(&set, &["nolog", "onlydelete"]).await;
    // `proxy_on_done` (nolog) and `proxy_on_delete` (onlydelete) ran in
    // microseconds; the 300 ms since the request headers are not theirs.
    for name in ["nolog", "onlydelete"] {
        let stats = rt.stats_of(name).unwrap();
        assert_eq!(stats.calls(metrics::Phase::Done), 1, "{name}");
        let took = stats.duration_sum_us(metrics::Phase::Done);
        assert!(took < 250_000, "{name}: done phase took {took} us");
    }
}

#[tokio::test]
async fn an_instance_is_idle_from_its_stream_end() {
    let rt = runtime();
    let set = rt
        .load(vec![module("noend", &NO_END.replace("PRELUDE", PRELUDE))])
        .unwrap();
    let pl = [Arc::from("noend")];
    let mut s = set.stream(&pl, info());
    let mut req = Request::get("/").body(()).unwrap().into_parts().0;
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ended = std::time::Instant::now();
    s.finish(0, 0);
    // No end callback ran: the instance is idle from the stream's end, not
    // from its request headers 300 ms before (trim would free it early).
    let idle = worker::idle_since(set.id, 0);
    assert!(
        idle.iter().any(|t| *t >= ended),
        "idle since {idle:?}, stream ended {ended:?}"
    );
}

/// Adds `x-a: same-value` to each request.
const ADDER: &str = r#"
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  PRELUDE
  (data (i32.const 100) "x-a")
  (data (i32.const 200) "same-value")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 3) (i32.const 200) (i32.const 10)))
    (i32.const 0))
)
"#;

#[tokio::test]
async fn filters_do_not_share_interned_header_values() {
    let rt = runtime();
    let adder = ADDER.replace("PRELUDE", PRELUDE);
    let set = rt
        .load(vec![module("adder1", &adder), module("adder2", &adder)])
        .unwrap();
    let pl = [Arc::from("adder1"), Arc::from("adder2")];
    let mut kept = Vec::new();
    for _ in 0..4 {
        let mut s = set.stream(&pl, info());
        let mut req = Request::get("/").body(()).unwrap().into_parts().0;
        assert!(matches!(
            s.request_headers(&mut req, true).await,
            Verdict::Continue
        ));
        s.finish(0, 0);
        kept.push(req);
    }
    let ptrs = |req: &http::request::Parts| -> Vec<*const u8> {
        req.headers
            .get_all("x-a")
            .iter()
            .map(|v| {
                assert_eq!(v, "same-value");
                v.as_bytes().as_ptr()
            })
            .collect()
    };
    let (third, fourth) = (ptrs(&kept[2]), ptrs(&kept[3]));
    assert_eq!(third.len(), 2);
    // Each filter reuses the value it keeps writing ...
    assert_eq!(third, fourth);
    // ... from its own table: one filter's hit says nothing of another's.
    assert_ne!(third[0], third[1]);
}
