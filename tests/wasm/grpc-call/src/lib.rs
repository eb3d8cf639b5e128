//! Fixture: gRPC callouts with the community SDK, driven by request headers.
//!
//! - `x-grpc: call` asks `<x-grpc-service or wasp.test.Auth>/Check` on the
//!   cluster `<x-grpc-cluster or auth>` with the message `x-token` (and the
//!   same value as metadata `x-user`), timeout `x-grpc-timeout-ms` (default
//!   2000). OK: the request goes on with `x-grpc-answer` = the reply. Else
//!   403 with `x-grpc-status` / `x-grpc-message` (from `get_grpc_status`).
//! - `x-grpc: stream` opens `wasp.test.Auth/Echo`, sends the comma-separated
//!   `x-words` one message each, half-closes, and lets the request go on at
//!   close with what it saw: `x-grpc-stream` (messages), `x-grpc-initial`,
//!   `x-grpc-trailing` (metadata values) and `x-grpc-close` (status).
//! - `x-grpc: cancel` opens `wasp.test.Auth/Hold`, sends one message, and
//!   when the server's initial metadata arrives cancels the stream and lets
//!   the request go on with `x-grpc-cancelled: yes` (a later close would
//!   add `x-grpc-close`, which must never happen).
//!
//! - `x-grpc: hold` opens `wasp.test.Auth/Hold`, sends one message and
//!   pauses for good: the stream stays open until the request goes away.
//! - `x-grpc: body` lets the headers go, buffers the request body, and at
//!   its end asks `Check` with the whole body as the message, pausing the
//!   body until the answer (OK: the body goes on; else 403 as above).
//!
//! - `x-grpc: trailers` asks `Check` with the request trailer `x-token`
//!   from the trailers callback and pauses the trailers until the answer
//!   (OK: they go on with `x-grpc-answer` added; else 403 as above).
//!
//! A dispatch error answers 500 with `x-grpc-error`.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Grpc::default()) });
}}

#[derive(Default)]
struct Grpc {
    cancel: bool,
    body: bool,
    trailers: bool,
    messages: Vec<String>,
    initial: String,
    trailing: String,
}

fn text(b: Option<Vec<u8>>) -> String {
    String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
}

impl Grpc {
    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }

    fn failed(&self, status: Status) -> Action {
        let s = format!("{status:?}");
        self.send_http_response(500, vec![("x-grpc-error", &s)], Some(b"dispatch failed\n"));
        Action::Pause
    }
}

impl Context for Grpc {
    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        if status == 0 {
            let answer = text(self.get_grpc_call_response_body(0, size));
            if self.trailers {
                self.set_http_request_trailer("x-grpc-answer", Some(&answer));
            } else if !self.body {
                // Once the body is seen the headers have gone upstream
                // (changing them is BAD_ARGUMENT, in Envoy too).
                self.set_http_request_header("x-grpc-answer", Some(&answer));
            }
            self.resume_http_request();
            return;
        }
        let (code, message) = self.get_grpc_status();
        let code = code.to_string();
        let message = message.unwrap_or_default();
        self.send_http_response(
            403,
            vec![("x-grpc-status", &code), ("x-grpc-message", &message)],
            Some(b"denied by gRPC\n"),
        );
    }

    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _n: u32) {
        if self.cancel {
            self.cancel_grpc_stream(token);
            self.set_http_request_header("x-grpc-cancelled", Some("yes"));
            self.resume_http_request();
            return;
        }
        self.initial = text(self.get_grpc_stream_initial_metadata_value("x-initial"));
    }

    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let m = text(self.get_grpc_stream_message(0, size));
        self.messages.push(m);
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _n: u32) {
        self.trailing = text(self.get_grpc_stream_trailing_metadata_value("x-trailing"));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        let (_, message) = self.get_grpc_status();
        self.set_http_request_header("x-grpc-stream", Some(&self.messages.join(",")));
        self.set_http_request_header("x-grpc-initial", Some(&self.initial));
        self.set_http_request_header("x-grpc-trailing", Some(&self.trailing));
        self.set_http_request_header("x-grpc-close", Some(&status.to_string()));
        self.set_http_request_header("x-grpc-close-message", Some(&message.unwrap_or_default()));
        self.resume_http_request();
    }
}

impl HttpContext for Grpc {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let cluster = self
            .header("x-grpc-cluster")
            .unwrap_or_else(|| "auth".into());
        match self.header("x-grpc").as_deref() {
            Some("call") => {
                let service = self
                    .header("x-grpc-service")
                    .unwrap_or_else(|| "wasp.test.Auth".into());
                let token = self.header("x-token").unwrap_or_default();
                let ms = self
                    .header("x-grpc-timeout-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2000);
                match self.dispatch_grpc_call(
                    &cluster,
                    &service,
                    "Check",
                    vec![("x-user", token.as_bytes())],
                    Some(token.as_bytes()),
                    Duration::from_millis(ms),
                ) {
                    Ok(_) => Action::Pause,
                    Err(s) => self.failed(s),
                }
            }
            Some("stream") => {
                let words = self.header("x-words").unwrap_or_default();
                match self.open_grpc_stream(
                    &cluster,
                    "wasp.test.Auth",
                    "Echo",
                    vec![("x-mode", b"echo")],
                ) {
                    Ok(token) => {
                        for w in words.split(',').filter(|w| !w.is_empty()) {
                            self.send_grpc_stream_message(token, Some(w.as_bytes()), false);
                        }
                        self.send_grpc_stream_message(token, None, true);
                        Action::Pause
                    }
                    Err(s) => self.failed(s),
                }
            }
            Some("hold") => {
                match self.open_grpc_stream(&cluster, "wasp.test.Auth", "Hold", vec![]) {
                    Ok(token) => {
                        self.send_grpc_stream_message(token, Some(b"hold"), false);
                        Action::Pause
                    }
                    Err(s) => self.failed(s),
                }
            }
            Some("cancel") => {
                match self.open_grpc_stream(&cluster, "wasp.test.Auth", "Hold", vec![]) {
                    Ok(token) => {
                        self.cancel = true;
                        self.send_grpc_stream_message(token, Some(b"hold"), false);
                        Action::Pause
                    }
                    Err(s) => self.failed(s),
                }
            }
            Some("body") => {
                self.body = true;
                Action::Continue
            }
            Some("trailers") => {
                self.trailers = true;
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if !self.trailers {
            return Action::Continue;
        }
        let token = self.get_http_request_trailer("x-token").unwrap_or_default();
        match self.dispatch_grpc_call(
            "auth",
            "wasp.test.Auth",
            "Check",
            vec![("x-user", b"trailers")],
            Some(token.as_bytes()),
            Duration::from_secs(2),
        ) {
            Ok(_) => Action::Pause,
            Err(s) => self.failed(s),
        }
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.body {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        match self.dispatch_grpc_call(
            "auth",
            "wasp.test.Auth",
            "Check",
            vec![("x-user", b"body")],
            Some(&body),
            Duration::from_secs(2),
        ) {
            Ok(_) => Action::Pause,
            Err(s) => self.failed(s),
        }
    }
}
