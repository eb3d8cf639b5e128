//! Fixture: increments `counter` in shared data with a CAS loop on each
//! request, then proves CAS conflicts are reported by writing again with the
//! stale CAS. Response headers: `x-counter` (value after increment) and
//! `x-cas-conflict` (`1` when the stale write got CAS_MISMATCH).
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http { counter: 0, conflict: false }) });
}}

struct Http {
    counter: u64,
    conflict: bool,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        loop {
            let (v, cas) = self.get_shared_data("counter");
            let n: u64 = v
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let next = (n + 1).to_string();
            match self.set_shared_data("counter", Some(next.as_bytes()), cas) {
                Ok(()) => {
                    self.counter = n + 1;
                    if cas.is_some() {
                        // The CAS we used is now stale: this write must be refused.
                        self.conflict = matches!(
                            self.set_shared_data("counter", Some(b"garbage"), cas),
                            Err(Status::CasMismatch)
                        );
                    } else {
                        self.conflict = true;
                    }
                    break;
                }
                Err(Status::CasMismatch) => continue,
                Err(_) => break,
            }
        }
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-counter", Some(&self.counter.to_string()));
        self.set_http_response_header(
            "x-cas-conflict",
            Some(if self.conflict { "1" } else { "0" }),
        );
        Action::Continue
    }
}
