//! Fixture: header add/remove/replace on both sides, configured from JSON.
//!
//! Config: `{"request": {"add": {..}, "replace": {..}, "remove": [..]},
//!           "response": {...}}`. Also copies `:path` and `:method` into
//! `x-seen-path` / `x-seen-method` on the request so the host's pseudo
//! headers are visible.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde_json::Value;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
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
                log::info!("headers configured");
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

fn edits(section: &Value) -> (Vec<(String, String)>, Vec<(String, String)>, Vec<String>) {
    let pairs = |k: &str| -> Vec<(String, String)> {
        section
            .get(k)
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let remove = section
        .get("remove")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (pairs("add"), pairs("replace"), remove)
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (add, replace, remove) = edits(&self.cfg["request"]);
        for (k, v) in &add {
            self.add_http_request_header(k, v);
        }
        for (k, v) in &replace {
            self.set_http_request_header(k, Some(v));
        }
        for k in &remove {
            self.remove_http_request_header(k);
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let method = self.get_http_request_header(":method").unwrap_or_default();
        self.set_http_request_header("x-seen-path", Some(&path));
        self.set_http_request_header("x-seen-method", Some(&method));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (add, replace, remove) = edits(&self.cfg["response"]);
        for (k, v) in &add {
            self.add_http_response_header(k, v);
        }
        for (k, v) in &replace {
            self.set_http_response_header(k, Some(v));
        }
        for k in &remove {
            self.remove_http_response_header(k);
        }
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.set_http_response_header("x-seen-status", Some(&status));
        Action::Continue
    }
}
