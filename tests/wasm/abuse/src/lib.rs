//! Fixture: a hostile filter that asks the host for too much, one way per
//! request, chosen by the request header `x-abuse`:
//!
//! - `headers`: adds 30,000 distinct request headers;
//! - `set-headers`: replaces the request headers with 30,000 pairs;
//! - `local-headers`: answers locally with 30,000 headers;
//! - `fd-write`: one 4 MiB `fd_write` to stdout, then one with 100,000
//!   small iovecs; answers locally with what the host reported written
//!   (`x-big-written`, `x-many-written`);
//! - `local-lie`: a local response whose `content-length: 0` lies about a
//!   body that is itself an HTTP response;
//! - `shared-data`: eight 8 MiB shared-data values (keys from `x-n`);
//!   answers locally with how many writes were refused (`x-refused`);
//! - `metrics`: defines and increments 20,000 counters;
//! - `wasp-metric`: defines `wasp_requests_total` and a counter with a
//!   `filter` label;
//! - `callouts`: 500 `http_call`s with a 1 ms timeout to the cluster named
//!   by `x-cluster` (path `/slow?ms=300`); answers locally with how many were
//!   dispatched and refused (`x-dispatched`, `x-refused`).
//!
//! Any other request is clean: the filter adds `x-abuse-filter: seen`.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http;

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _h: usize, _b: usize, _t: usize) {}
}

#[repr(C)]
struct Iovec {
    ptr: *const u8,
    len: usize,
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    #[link_name = "fd_write"]
    fn raw_fd_write(fd: i32, iovs: i32, iovs_len: i32, nwritten: i32) -> i32;
}

/// One `fd_write` to stdout; the number of bytes the host says it wrote.
fn write_stdout(iovs: &[Iovec]) -> usize {
    let mut written: usize = 0;
    let errno = unsafe {
        raw_fd_write(
            1,
            iovs.as_ptr() as i32,
            iovs.len() as i32,
            &mut written as *mut usize as i32,
        )
    };
    if errno == 0 {
        written
    } else {
        0
    }
}

impl Http {
    fn answer(&self, headers: Vec<(&str, &str)>) -> Action {
        self.send_http_response(200, headers, Some(b"abused\n"));
        Action::Pause
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let mode = self.get_http_request_header("x-abuse").unwrap_or_default();
        match mode.as_str() {
            "headers" => {
                for i in 0..30_000 {
                    self.add_http_request_header(&format!("x-abuse-{i}"), "v");
                }
                Action::Continue
            }
            "set-headers" | "local-headers" => {
                let names: Vec<String> = (0..30_000).map(|i| format!("x-abuse-{i}")).collect();
                let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
                if mode == "set-headers" {
                    self.set_http_request_headers(pairs);
                    Action::Continue
                } else {
                    self.send_http_response(200, pairs, None);
                    Action::Pause
                }
            }
            "fd-write" => {
                let big = vec![b'a'; 4 << 20];
                let one = [Iovec {
                    ptr: big.as_ptr(),
                    len: big.len(),
                }];
                let big_written = write_stdout(&one);
                let line = b"x\n";
                let many: Vec<Iovec> = (0..100_000)
                    .map(|_| Iovec {
                        ptr: line.as_ptr(),
                        len: line.len(),
                    })
                    .collect();
                let many_written = write_stdout(&many);
                let (b, m) = (big_written.to_string(), many_written.to_string());
                self.answer(vec![("x-big-written", &b), ("x-many-written", &m)])
            }
            "local-lie" => {
                self.send_http_response(
                    200,
                    vec![("content-length", "0"), ("connection", "keep-alive")],
                    Some(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"),
                );
                Action::Pause
            }
            "shared-data" => {
                let n = self.get_http_request_header("x-n").unwrap_or_default();
                let value = vec![7u8; 8 << 20];
                let mut refused = 0;
                for i in 0..8 {
                    let key = format!("big-{n}-{i}");
                    if self.set_shared_data(&key, Some(&value), None).is_err() {
                        refused += 1;
                    }
                }
                let r = refused.to_string();
                self.answer(vec![("x-refused", &r)])
            }
            "metrics" => {
                for i in 0..20_000 {
                    if let Ok(id) =
                        hostcalls::define_metric(MetricType::Counter, &format!("abuse_m{i}_total"))
                    {
                        let _ = hostcalls::increment_metric(id, 1);
                    }
                }
                self.answer(vec![])
            }
            "wasp-metric" => {
                for name in ["wasp_requests_total", "abuse_labelled_total;filter=evil"] {
                    if let Ok(id) = hostcalls::define_metric(MetricType::Counter, name) {
                        let _ = hostcalls::increment_metric(id, 1);
                    }
                }
                self.answer(vec![])
            }
            "callouts" => {
                let cluster = self.get_http_request_header("x-cluster").unwrap_or_default();
                let (mut dispatched, mut refused) = (0, 0);
                for _ in 0..500 {
                    let call = self.dispatch_http_call(
                        &cluster,
                        vec![
                            (":method", "GET"),
                            (":path", "/slow?ms=300"),
                            (":authority", "target"),
                        ],
                        None,
                        vec![],
                        Duration::from_millis(1),
                    );
                    match call {
                        Ok(_) => dispatched += 1,
                        Err(_) => refused += 1,
                    }
                }
                let (d, r) = (dispatched.to_string(), refused.to_string());
                self.answer(vec![("x-dispatched", &d), ("x-refused", &r)])
            }
            _ => {
                self.add_http_request_header("x-abuse-filter", "seen");
                Action::Continue
            }
        }
    }
}
