//! Fixture: pauses each request, asks the cluster named by the plugin config
//! (default `authz`) `GET /check` with the caller's `x-user`, and allows the
//! request (adding `x-authz` = answer body) on 200, else answers 403.
//!
//! A config `root:CLUSTER` also makes the root context ask CLUSTER
//! `GET /check` (user `root`) from `proxy_on_configure`, and log, when the
//! answer comes, the plugin configuration its root context sees: a
//! per-route root's call must be answered on that root, under its config.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cluster: "authz".into() }) });
}}

struct Root {
    cluster: String,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, body_size: usize, _nt: usize) {
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let config = self.get_plugin_configuration().unwrap_or_default();
        log::info!(
            "root callout answered ({}) under config {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&config)
        );
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(c) = self.get_plugin_configuration() {
            let c = String::from_utf8_lossy(&c)
                .trim()
                .trim_matches('"')
                .to_string();
            if let Some(at) = c.strip_prefix("root:") {
                let asked = self.dispatch_http_call(
                    at,
                    vec![
                        (":method", "GET"),
                        (":path", "/check"),
                        (":authority", "authz"),
                        ("x-user", "root"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(2),
                );
                if let Err(e) = asked {
                    log::error!("root callout to {at} failed: {e:?}");
                }
                self.cluster = at.to_string();
            } else if !c.is_empty() {
                self.cluster = c;
            }
        }
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            cluster: self.cluster.clone(),
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    cluster: String,
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, body_size: usize, _nt: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        if status == "200" {
            self.set_http_request_header("x-authz", Some(&String::from_utf8_lossy(&body)));
            self.resume_http_request();
        } else {
            self.send_http_response(
                403,
                vec![("x-authz-status", &status)],
                Some(b"denied by authz\n"),
            );
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let user = self.get_http_request_header("x-user").unwrap_or_default();
        match self.dispatch_http_call(
            &self.cluster,
            vec![
                (":method", "GET"),
                (":path", "/check"),
                (":authority", "authz"),
                ("x-user", &user),
            ],
            None,
            vec![],
            Duration::from_secs(2),
        ) {
            Ok(_) => Action::Pause,
            Err(status) => {
                let s = format!("{status:?}");
                self.send_http_response(
                    500,
                    vec![("x-callout-error", &s)],
                    Some(b"callout failed\n"),
                );
                Action::Pause
            }
        }
    }
}
