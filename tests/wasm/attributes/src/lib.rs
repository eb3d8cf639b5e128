//! Fixture: reports what the host answers for Envoy's documented attributes,
//! so the differential suite can compare wasp with Envoy byte for byte.
//!
//! In the response headers it adds `x-attr-<path with dots as dashes>` per
//! attribute: the value in hex, or `none` when the host had none. Also
//! `x-log-level` (`proxy_get_log_level`), and `x-ff-<name>` with the outcome
//! of `proxy_call_foreign_function` for `clear_route_cache` and an unknown
//! name (`ok:<hex>` or the status). At `on_log` it logs
//! `upstream.transport_failure_reason` (hex, or `none`).
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http::default()) });
}}

#[derive(Default)]
struct Http {
    request_side: Vec<(String, String)>,
}

impl Context for Http {}

const REQUEST_ATTRIBUTES: &[&str] = &[
    "request.path",
    "request.url_path",
    "request.host",
    "request.scheme",
    "request.method",
    "request.referer",
    "request.useragent",
    "request.query",
    "request.protocol",
    "request.id",
    "request.time",
    "source.address",
    "source.port",
    "destination.address",
    "destination.port",
    "connection.id",
    "connection.mtls",
    "connection.requested_server_name",
    "connection.tls_version",
    "connection.subject_peer_certificate",
    "connection.uri_san_peer_certificate",
    "connection.dns_san_peer_certificate",
    "connection.sha256_peer_certificate_digest",
    "connection.subject_local_certificate",
    "connection.uri_san_local_certificate",
    "connection.dns_san_local_certificate",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
];

const RESPONSE_ATTRIBUTES: &[&str] = &[
    "response.code",
    "response.code_details",
    "response.flags",
    "response.grpc_status",
    "upstream.address",
    "upstream.port",
    "upstream.tls_version",
    "upstream.local_address",
    "upstream.transport_failure_reason",
    "upstream.subject_peer_certificate",
    "upstream.uri_san_peer_certificate",
    "upstream.dns_san_peer_certificate",
    "upstream.sha256_peer_certificate_digest",
    "upstream.subject_local_certificate",
    "upstream.uri_san_local_certificate",
    "upstream.dns_san_local_certificate",
    "xds.cluster_name",
    "xds.route_name",
    "cluster_name",
    "route_name",
];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read(path: &str) -> (String, String) {
    let segs: Vec<&str> = path.split('.').collect();
    let v = match hostcalls::get_property(segs) {
        Ok(Some(b)) => hex(&b),
        Ok(None) => "none".to_string(),
        Err(s) => format!("{s:?}"),
    };
    (format!("x-attr-{}", path.replace(['.', '_'], "-")), v)
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.request_side = REQUEST_ATTRIBUTES.iter().map(|p| read(p)).collect();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in std::mem::take(&mut self.request_side) {
            self.set_http_response_header(&k, Some(&v));
        }
        for p in RESPONSE_ATTRIBUTES {
            let (k, v) = read(p);
            self.set_http_response_header(&k, Some(&v));
        }
        let level = match hostcalls::get_log_level() {
            Ok(l) => format!("{}", l as u32),
            Err(s) => format!("{s:?}"),
        };
        self.set_http_response_header("x-log-level", Some(&level));
        for name in ["clear_route_cache", "no_such_function"] {
            let v = match hostcalls::call_foreign_function(name, Some(&[])) {
                Ok(r) => format!("ok:{}", hex(&r.unwrap_or_default())),
                Err(s) => format!("{s:?}"),
            };
            self.set_http_response_header(&format!("x-ff-{}", name.replace('_', "-")), Some(&v));
        }
        Action::Continue
    }

    /// A proxy-made answer runs no response callback: what a failed
    /// upstream connection left to read is logged here.
    fn on_log(&mut self) {
        let (_, v) = read("upstream.transport_failure_reason");
        proxy_wasm::hostcalls::log(
            LogLevel::Info,
            &format!("on_log upstream.transport_failure_reason={v}"),
        )
        .ok();
    }
}
