//! {{name}}: a wasp filter.
//!
//! It adds a header to every request (so the upstream sees it) and to every
//! response. Change the hooks to do what you need; see the wasp-sdk docs
//! (`cargo doc --open -p wasp-sdk`) for headers, bodies, properties, metrics,
//! callouts and timers.
//!
//! Configure it in wasp.toml:
//!
//! ```toml
//! [filters.{{crate_name}}]
//! module = "{{crate_name}}.wasm"
//! config = { header = "x-hello", value = "world" }
//! ```

use std::rc::Rc;
use wasp_sdk::{Action, ConfigError, Filter, Request, Response, Root};

/// The filter's configuration: the `config = { ... }` table in wasp.toml.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Header to add.
    #[serde(default = "default_header")]
    pub header: String,
    /// Its value.
    #[serde(default = "default_value")]
    pub value: String,
}

fn default_header() -> String {
    "x-hello".to_string()
}

fn default_value() -> String {
    "world".to_string()
}

/// One instance per HTTP request.
pub struct AddHeader {
    config: Rc<Config>,
}

impl Filter for AddHeader {
    type Config = Config;
    type State = Config;

    /// Runs when wasp loads the filter: reject bad config here, with a message.
    fn configure(config: Config, _root: &mut Root) -> Result<Config, ConfigError> {
        if config.header.is_empty() {
            return Err(ConfigError::new("header: must not be empty"));
        }
        Ok(config)
    }

    fn new(config: &Rc<Config>) -> Self {
        AddHeader {
            config: config.clone(),
        }
    }

    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        req.set_header(&self.config.header, &self.config.value);
        wasp_sdk::debug!("added {} to {:?}", self.config.header, req.path());
        Action::Continue
    }

    fn on_response_headers(&mut self, resp: &mut Response) -> Action {
        resp.set_header(&self.config.header, &self.config.value);
        Action::Continue
    }
}

wasp_sdk::register!(AddHeader);

#[cfg(test)]
mod tests {
    use super::*;
    use wasp_sdk::testing::{Harness, TestRequest, TestResponse};

    #[test]
    fn adds_the_header_both_ways() {
        let mut h = Harness::<AddHeader>::new().build();
        let done = h.run_with(TestRequest::get("/hello"), TestResponse::ok().body("hi"));
        assert_eq!(done.upstream().header("x-hello"), Some("world"));
        assert_eq!(done.response_header("x-hello"), Some("world"));
        assert_eq!(done.response().body_text(), "hi");
    }

    #[test]
    fn header_comes_from_the_config() {
        // The same TOML you write in wasp.toml's `config = { ... }`.
        let mut h = Harness::<AddHeader>::new()
            .config_toml("header = \"x-team\"\nvalue = \"payments\"")
            .build();
        let done = h.run(TestRequest::get("/"));
        assert_eq!(done.upstream().header("x-team"), Some("payments"));
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let err = Harness::<AddHeader>::new()
            .config_toml(r#"header = """#)
            .try_build()
            .err()
            .unwrap();
        assert_eq!(err, "header: must not be empty");
    }
}
