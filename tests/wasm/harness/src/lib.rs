//! Fixture for `wasp filter test`'s harness: the things a harness that does
//! not behave like the proxy gets wrong.
//!
//! - `on_configure` asks cluster `settings` `GET /settings`; the answer's
//!   body is added to every request as `x-setting` (absent until answered).
//! - Every request sends a fire-and-forget `GET /audit` to cluster `audit`;
//!   its answer is logged (`audit answered <status>`).
//! - `x-log-level` on the request: the level `proxy_get_log_level` answers.
//! - `x-late: request`: answers 413 at the end of the request body, after
//!   the first chunks were forwarded; `x-late: response`: answers 451 at the
//!   end of the response body.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    static SETTING: RefCell<Option<String>> = const { RefCell::new(None) };
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, size: usize, _nt: usize) {
        let body = self.get_http_call_response_body(0, size).unwrap_or_default();
        SETTING.with(|s| *s.borrow_mut() = Some(String::from_utf8_lossy(&body).into_owned()));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let _ = self.dispatch_http_call(
            "settings",
            vec![(":method", "GET"), (":path", "/settings"), (":authority", "settings")],
            None,
            vec![],
            Duration::from_secs(1),
        );
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { late: String::new() }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    late: String,
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, _size: usize, _nt: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let _ = hostcalls::log(LogLevel::Info, &format!("audit answered {status}"));
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.late = self.get_http_request_header("x-late").unwrap_or_default();
        if let Some(s) = SETTING.with(|s| s.borrow().clone()) {
            self.set_http_request_header("x-setting", Some(&s));
        }
        let level = match hostcalls::get_log_level() {
            Ok(l) => format!("{l:?}"),
            Err(e) => format!("{e:?}"),
        };
        self.set_http_request_header("x-log-level", Some(&level));
        let _ = self.dispatch_http_call(
            "audit",
            vec![(":method", "GET"), (":path", "/audit"), (":authority", "audit")],
            None,
            vec![],
            Duration::from_secs(1),
        );
        Action::Continue
    }

    fn on_http_request_body(&mut self, _size: usize, eos: bool) -> Action {
        if eos && self.late == "request" {
            self.send_http_response(413, vec![], Some(b"too late\n"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _size: usize, eos: bool) -> Action {
        if eos && self.late == "response" {
            self.send_http_response(451, vec![], Some(b"too late\n"));
            return Action::Pause;
        }
        Action::Continue
    }
}
