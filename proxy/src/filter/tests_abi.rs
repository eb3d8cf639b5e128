//! ABI edge cases with hand-written guest modules (WAT): what SDK-built
//! fixtures never do on purpose: bad guest pointers, unknown imports, the
//! 0.2.0 version marker with `_start` and `malloc`, `proc_exit` during
//! start-up, missing exports, an initial memory over the cap.

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
    }
    assert_eq!(req.headers.get("x-edge").unwrap(), "ok");
    assert_eq!(req.headers.get("x-path").unwrap(), "/p?q");
    s.finish(0, 0);
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
