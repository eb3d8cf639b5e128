//! Fixture: answers `/deny*` locally with 403 and never goes upstream.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with("/deny") {
            self.send_http_response(
                403,
                vec![("x-local", "1"), ("content-type", "text/plain")],
                Some(b"denied by filter\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }
}
