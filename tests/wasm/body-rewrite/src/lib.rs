//! Fixture: buffers whole bodies (Pause until end of stream) and rewrites them:
//! request `foo` -> `bar`, response `world` -> `wasm`. Drops content-length
//! on both sides since the size changes.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

fn replace(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    String::from_utf8_lossy(body).replace(from, to).into_bytes()
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_request_header("content-length", None);
        Action::Continue
    }
    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, size) {
            let new = replace(&body, "foo", "bar");
            self.set_http_request_body(0, size, &new);
        }
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("content-length", None);
        Action::Continue
    }
    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_response_body(0, size) {
            let new = replace(&body, "world", "wasm");
            self.set_http_response_body(0, size, &new);
        }
        Action::Continue
    }
}
