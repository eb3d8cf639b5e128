//! Fixture: a module that says which build it is, for reload benchmarks.
//!
//! Every response gets `x-module-version: <VERSION>`, where `VERSION` is a
//! fixed-length marker in the module's data. `bench/reload.sh` patches the
//! marker's bytes to make as many distinct versions of the same module as it
//! needs (each with its own hash, so each one is a cold compile), without a
//! Rust toolchain at bench time. Besides that it edits headers like the
//! `headers` fixture (configured from JSON), so it is a realistic size.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde_json::Value;
use std::rc::Rc;

/// The marker: `wasp-version:` then 16 characters the bench replaces.
static VERSION: &[u8; 29] = b"wasp-version:0000000000000000";

fn version() -> &'static str {
    // Read through black_box so the optimiser keeps the bytes as data, at a
    // place the bench can find, instead of folding them into code.
    let bytes: &[u8] = std::hint::black_box(&VERSION[13..]);
    std::str::from_utf8(bytes).unwrap_or("invalid")
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: Rc::new(Value::Null) }) });
}}

struct Root {
    cfg: Rc<Value>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            return true;
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => {
                log::info!("versioned filter {} configured", version());
                self.cfg = Rc::new(v);
                true
            }
            Err(e) => {
                log::error!("bad config: {e}");
                false
            }
        }
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            cfg: self.cfg.clone(),
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    cfg: Rc<Value>,
}

impl Context for Http {}

fn pairs(section: &Value, key: &str) -> Vec<(String, String)> {
    section
        .get(key)
        .and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in pairs(&self.cfg["request"], "add") {
            self.add_http_request_header(&k, &v);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in pairs(&self.cfg["response"], "add") {
            self.add_http_response_header(&k, &v);
        }
        self.set_http_response_header("x-module-version", Some(version()));
        Action::Continue
    }
}
