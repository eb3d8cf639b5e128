//! Hostile fixture for the isolation tests. Config (JSON, all optional):
//! - `configure_ms`: spin this long in `on_configure` (a slow start-up);
//! - `tick_ms`, `tick_work_ms`: ask for a tick every `tick_ms` and spin
//!   `tick_work_ms` in each `on_tick`; ticks are counted in shared data
//!   (`isolation.ticks`).
//!
//! Per request: `x-trap: 1` makes `on_http_request_headers` panic (a trap,
//! panic = "abort"); otherwise the request gets `x-filtered: 1` and the
//! response `x-filtered: 1` and `x-ticks: <count>`.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { tick_work_ms: 0 }) });
}}

struct Root {
    tick_work_ms: u64,
}

impl Context for Root {}

fn spin(ctx: &dyn Context, ms: u64) {
    let start = ctx.get_current_time();
    let until = start + Duration::from_millis(ms);
    while ctx.get_current_time() < until {
        std::hint::black_box(0u64);
    }
}

fn ticks(ctx: &dyn Context) -> (u64, Option<u32>) {
    let (v, cas) = ctx.get_shared_data("isolation.ticks");
    let n = v
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (n, cas)
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let cfg: serde_json::Value = self
            .get_plugin_configuration()
            .filter(|_| size > 0)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        if num("configure_ms") > 0 {
            spin(self, num("configure_ms"));
        }
        self.tick_work_ms = num("tick_work_ms");
        if num("tick_ms") > 0 {
            self.set_tick_period(Duration::from_millis(num("tick_ms")));
        }
        true
    }
    fn on_tick(&mut self) {
        loop {
            let (n, cas) = ticks(self);
            let next = (n + 1).to_string();
            match self.set_shared_data("isolation.ticks", Some(next.as_bytes()), cas) {
                Err(Status::CasMismatch) => continue,
                _ => break,
            }
        }
        if self.tick_work_ms > 0 {
            spin(self, self.tick_work_ms);
        }
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-trap").as_deref() == Some("1") {
            panic!("x-trap: 1: trapping on purpose");
        }
        self.set_http_request_header("x-filtered", Some("1"));
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (n, _) = ticks(self);
        self.set_http_response_header("x-filtered", Some("1"));
        self.set_http_response_header("x-ticks", Some(&n.to_string()));
        Action::Continue
    }
}
