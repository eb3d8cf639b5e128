//! Fixture: a pass-through HTTP filter (for overhead measurements).
use proxy_wasm::traits::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http) });
}}

struct Http;

impl Context for Http {}

impl HttpContext for Http {}
