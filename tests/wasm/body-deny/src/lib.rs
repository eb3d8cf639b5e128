//! Fixture: answers 403 (`x-body-deny: 1`) at the first request body chunk
//! that contains `deny`, in the middle of the body, without waiting for
//! its end; other chunks pass unchanged.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_body(&mut self, size: usize, _eos: bool) -> Action {
        let chunk = self.get_http_request_body(0, size).unwrap_or_default();
        if chunk.windows(4).any(|w| w == b"deny") {
            self.send_http_response(
                403,
                vec![("x-body-deny", "1")],
                Some(b"body denied by filter\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }
}
