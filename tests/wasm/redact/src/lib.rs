//! Fixture: a `body_redact`-style filter that rewrites `secret` in bodies and,
//! like the filters in proxy-wasm-cpp-sdk#146 and rust-sdk#180, does NOT
//! remove `content-length` in its header callbacks: the host must re-frame.
//!
//! Its configuration is a list of words:
//! - `shrink` (`secret` -> `[r]`) or `grow` (`secret` -> `[REDACTED]`);
//! - `buffer` (PAUSE until the end of the body, then rewrite it whole) or
//!   `stream` (rewrite each chunk as it comes);
//! - `hold`: PAUSE until the end of the body, then pass it on unchanged (a
//!   buffering filter that inspects nothing, placed after one that does);
//! - `every-other`: PAUSE on every other body callback before the end (the
//!   1st, 3rd, ...), CONTINUE on the others, passing the body unchanged (a
//!   filter that buffers and lets go again while later ones hold theirs);
//! - `request` and/or `response`: which bodies (both when neither is named);
//! - `not-modified`: also turns the response's `:status` into 304 in its
//!   header callback (a 304 has no body, whatever its head declares);
//! - `callout`: its response-header callback asks cluster `slow`
//!   `GET /slow?ms=1500` and pauses until the answer (a slow header phase
//!   while the request body may still be on its way).
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone, Copy)]
struct Mode {
    grow: bool,
    buffer: bool,
    hold: bool,
    every_other: bool,
    request: bool,
    response: bool,
    not_modified: bool,
    callout: bool,
}

#[derive(Default)]
struct Root {
    mode: Mode,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        let words: Vec<&str> = config.split_whitespace().collect();
        let has = |w: &str| words.contains(&w);
        self.mode = Mode {
            grow: has("grow"),
            buffer: has("buffer"),
            hold: has("hold"),
            every_other: has("every-other"),
            request: has("request") || !has("response"),
            response: has("response") || !has("request"),
            not_modified: has("not-modified"),
            callout: has("callout"),
        };
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            mode: self.mode,
            calls: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    mode: Mode,
    /// Body callbacks so far (`every-other`).
    calls: u32,
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, _body: usize, _nt: usize) {
        self.resume_http_response();
    }
}

impl Http {
    /// `every-other`: whether this callback pauses.
    fn alternate(&mut self, eos: bool) -> Action {
        self.calls += 1;
        if !eos && self.calls % 2 == 1 {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn redact(&self, body: &[u8]) -> Vec<u8> {
        let to = if self.mode.grow { "[REDACTED]" } else { "[r]" };
        String::from_utf8_lossy(body)
            .replace("secret", to)
            .into_bytes()
    }
}

impl HttpContext for Http {
    fn on_http_response_headers(&mut self, _num: usize, _eos: bool) -> Action {
        if self.mode.not_modified {
            self.set_http_response_header(":status", Some("304"));
        }
        if self.mode.callout {
            let asked = self.dispatch_http_call(
                "slow",
                vec![
                    (":method", "GET"),
                    (":path", "/slow?ms=1500"),
                    (":authority", "slow"),
                ],
                None,
                vec![],
                Duration::from_secs(10),
            );
            if asked.is_ok() {
                return Action::Pause;
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.mode.request {
            return Action::Continue;
        }
        if self.mode.every_other {
            return self.alternate(eos);
        }
        if (self.mode.buffer || self.mode.hold) && !eos {
            return Action::Pause;
        }
        if self.mode.hold {
            return Action::Continue;
        }
        if let Some(body) = self.get_http_request_body(0, size) {
            let new = self.redact(&body);
            self.set_http_request_body(0, size, &new);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.mode.response {
            return Action::Continue;
        }
        if self.mode.every_other {
            return self.alternate(eos);
        }
        if (self.mode.buffer || self.mode.hold) && !eos {
            return Action::Pause;
        }
        if self.mode.hold {
            return Action::Continue;
        }
        if let Some(body) = self.get_http_response_body(0, size) {
            let new = self.redact(&body);
            self.set_http_response_body(0, size, &new);
        }
        Action::Continue
    }
}
