//! Fixture: at the end of the request body, asks cluster `authz` about the
//! user named in the body and pauses until the answer (an "approve the
//! body" filter): the host holds the whole body until the answer resumes it
//! (proxy-wasm-rust-sdk#66) or the filter answers 403. With request header
//! `x-check-response` it does the same at the end of the response body,
//! so that both bodies can wait at once. Request header `x-authz-cluster`
//! names another cluster to ask (tests: one that never answers).
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http::default()) });
}}

#[derive(Default)]
struct Http {
    cluster: Option<String>,
    check_response: bool,
    request_token: Option<u32>,
}

impl Http {
    fn ask(&self, user: &str) -> Option<u32> {
        self.dispatch_http_call(
            self.cluster.as_deref().unwrap_or("authz"),
            vec![
                (":method", "GET"),
                (":path", "/check"),
                (":authority", "authz"),
                ("x-user", user),
            ],
            None,
            vec![],
            Duration::from_secs(1),
        )
        .ok()
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, _nh: usize, _body: usize, _nt: usize) {
        let ok = self.get_http_call_response_header(":status").as_deref() == Some("200");
        let request = self.request_token == Some(token);
        match (ok, request) {
            (true, true) => self.resume_http_request(),
            (true, false) => self.resume_http_response(),
            (false, _) => self.send_http_response(403, vec![], Some(b"body denied\n")),
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.check_response = self.get_http_request_header("x-check-response").is_some();
        self.cluster = self.get_http_request_header("x-authz-cluster");
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        let user = self
            .get_http_request_body(0, size)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        match self.ask(&user) {
            Some(t) => {
                self.request_token = Some(t);
                Action::Pause
            }
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.check_response {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let user = self
            .get_http_response_body(0, size)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        match self.ask(&user) {
            Some(_) => Action::Pause,
            None => Action::Continue,
        }
    }
}
