//! Fixture: the benchmark filter. Adds one request header and two response
//! headers, the smallest filter that does real work in both header phases;
//! bench/ runs the same module in wasp and in Envoy.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.add_http_request_header("x-wasm-request", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.add_http_response_header("x-wasm-response", "1");
        self.add_http_response_header("x-wasm-filter", "add-headers");
        Action::Continue
    }
}
