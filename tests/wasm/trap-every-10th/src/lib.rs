//! Hostile fixture: panics (a trap, with panic = "abort") on every 10th request
//! the VM sees; the counter lives in the VM, so a rebuilt VM starts again.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::cell::Cell;

thread_local! {
    static SEEN: Cell<u32> = const { Cell::new(0) };
}

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let n = SEEN.with(|s| {
            s.set(s.get() + 1);
            s.get()
        });
        if n % 10 == 0 {
            panic!("request {n}: trapping on purpose");
        }
        self.set_http_request_header("x-seen", Some(&n.to_string()));
        Action::Continue
    }
}
