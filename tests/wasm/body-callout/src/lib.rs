//! Fixture: at the end of the request body, asks cluster `authz` about the
//! user named in the body and pauses until the answer (an "approve the
//! body" filter): the host holds the whole body until the answer resumes it
//! (proxy-wasm-rust-sdk#66) or the filter answers 403.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, _body: usize, _nt: usize) {
        if self.get_http_call_response_header(":status").as_deref() == Some("200") {
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![], Some(b"body denied\n"));
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        let user = self
            .get_http_request_body(0, size)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        match self.dispatch_http_call(
            "authz",
            vec![
                (":method", "GET"),
                (":path", "/check"),
                (":authority", "authz"),
                ("x-user", &user),
            ],
            None,
            vec![],
            Duration::from_secs(1),
        ) {
            Ok(_) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }
}
