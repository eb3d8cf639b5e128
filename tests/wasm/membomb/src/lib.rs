//! Hostile fixture: on `/bomb`, allocates until the host's memory cap stops it.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http { hoard: Vec::new() }) });
}}

struct Http {
    hoard: Vec<Vec<u8>>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header(":path").as_deref() == Some("/bomb") {
            loop {
                let chunk = vec![1u8; 1 << 20];
                self.hoard.push(std::hint::black_box(chunk));
            }
        }
        Action::Continue
    }
}
