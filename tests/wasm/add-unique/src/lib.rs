//! Fixture: the benchmark filter (tests/wasm/add-headers) plus one request
//! header whose value differs on every request, as a request id or trace
//! parent does: bench/instructions.sh (FILTER=add-unique) measures the
//! host's header interning when most values written are never seen again.
use std::cell::Cell;

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

thread_local! {
    static SEQ: Cell<u64> = const { Cell::new(0) };
}

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let n = SEQ.with(|s| {
            let n = s.get().wrapping_add(1);
            s.set(n);
            n
        });
        // 36 bytes, shaped like a UUID.
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            n as u32,
            (n >> 32) as u16,
            n & 0xfff,
            (n >> 12) & 0xfff,
            n.wrapping_mul(0x9e37_79b9_7f4a_7c15) & 0xffff_ffff_ffff
        );
        self.add_http_request_header("x-wasm-request", "1");
        self.add_http_request_header("x-wasm-id", &id);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.add_http_response_header("x-wasm-response", "1");
        self.add_http_response_header("x-wasm-filter", "add-headers");
        Action::Continue
    }
}
