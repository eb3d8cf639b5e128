//! Fixture: appends its configured name to `x-order` on the request and to
//! `x-order` on the response; three instances show the chain order.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { name: Rc::from("?") }) });
}}

struct Root {
    name: Rc<str>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(c) = self.get_plugin_configuration() {
            self.name = Rc::from(String::from_utf8_lossy(&c).trim().trim_matches('"'));
        }
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            name: self.name.clone(),
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    name: Rc<str>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let v = self.get_http_request_header("x-order").unwrap_or_default();
        self.set_http_request_header("x-order", Some(&format!("{v}{}", self.name)));
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let v = self.get_http_response_header("x-order").unwrap_or_default();
        self.set_http_response_header("x-order", Some(&format!("{v}{}", self.name)));
        Action::Continue
    }
}
