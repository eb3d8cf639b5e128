//! Fixture: ticks every 10ms and counts ticks in shared data (`timer.ticks`);
//! each response carries `x-ticks` with the current count. A plugin config
//! `no-ticks` asks for no ticks (`set_tick_period(0)`) from on_configure.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

fn read_ticks(ctx: &dyn Context) -> (u64, Option<u32>) {
    let (v, cas) = ctx.get_shared_data("timer.ticks");
    let n = v
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (n, cas)
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.set_tick_period(Duration::from_millis(10));
        true
    }
    fn on_configure(&mut self, _size: usize) -> bool {
        if self.get_plugin_configuration().as_deref() == Some(b"no-ticks".as_slice()) {
            self.set_tick_period(Duration::ZERO);
        }
        true
    }
    fn on_tick(&mut self) {
        loop {
            let (n, cas) = read_ticks(self);
            let next = (n + 1).to_string();
            match self.set_shared_data("timer.ticks", Some(next.as_bytes()), cas) {
                Err(Status::CasMismatch) => continue,
                _ => break,
            }
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
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (n, _) = read_ticks(self);
        self.set_http_response_header("x-ticks", Some(&n.to_string()));
        Action::Continue
    }
}
