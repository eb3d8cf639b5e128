//! Fixture: asks for a missing header and a missing property (both must come
//! back NOT_FOUND, i.e. `None`, not trap), sets `wasp.cluster` and
//! `fixture.note` properties, and echoes properties into response headers as
//! `x-prop-<path with dots>`; integer properties are decoded from i64 LE.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http { missing: String::new() }) });
}}

struct Http {
    missing: String,
}

impl Context for Http {}

const STRINGS: &[&str] = &[
    "request.path",
    "request.url_path",
    "request.host",
    "request.scheme",
    "request.method",
    "request.id",
    "request.protocol",
    "source.address",
    "destination.address",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "listener_name",
    "route_name",
    "cluster_name",
    "upstream.address",
    "fixture.note",
    "wasp.cluster",
];
const INTS: &[&str] = &[
    "source.port",
    "destination.port",
    "response.code",
    "request.time",
];

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let h = self.get_http_request_header("x-definitely-missing");
        let p = self.get_property(vec!["no", "such", "property"]);
        self.missing = format!("{}/{}", h.is_none(), p.is_none());
        self.set_property(vec!["wasp", "cluster"], Some(b"reviews-v2"));
        self.set_property(vec!["fixture", "note"], Some(b"hello"));
        if let Some(map) = self.get_property(vec!["request", "headers"]) {
            self.set_http_request_header("x-headers-map-len", Some(&map.len().to_string()));
        }
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-missing", Some(&self.missing.clone()));
        for path in STRINGS {
            let segs: Vec<&str> = path.split('.').collect();
            let v = self
                .get_property(segs)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|| "<none>".into());
            self.set_http_response_header(&format!("x-prop-{path}"), Some(&v));
        }
        for path in INTS {
            let segs: Vec<&str> = path.split('.').collect();
            let v = match self.get_property(segs) {
                Some(b) if b.len() == 8 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&b);
                    i64::from_le_bytes(a).to_string()
                }
                Some(_) => "<bad>".into(),
                None => "<none>".into(),
            };
            self.set_http_response_header(&format!("x-prop-{path}"), Some(&v));
        }
        Action::Continue
    }
}
