//! Hostile fixture: rejects every configuration.
use proxy_wasm::traits::*;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        log::warn!("configure-false: rejecting the configuration");
        false
    }
}
