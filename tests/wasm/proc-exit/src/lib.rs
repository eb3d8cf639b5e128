//! Hostile fixture: calls `std::process::exit(3)` on `/exit` (WASI
//! `proc_exit` on wasip1; a trap on wasm32-unknown-unknown).
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header(":path").as_deref() == Some("/exit") {
            println!("exiting on purpose");
            std::process::exit(3);
        }
        Action::Continue
    }
}
