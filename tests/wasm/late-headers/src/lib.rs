//! Fixture: header changes after the body has been seen, and the response
//! callbacks on a local reply. What it does depends on the path:
//!
//! - always: at the end of the request body, adds request header
//!   `x-late-req: 1` and remembers the host's status; the response headers
//!   get `x-late-req-status: <status>` and `x-resp-seen: <:status>`; at the
//!   end of the response body it adds response header `x-late-resp: 1`
//!   and appends `[late-resp:<status>]` to the body (a length change);
//! - `hold-req` in the path: PAUSE from the request headers (no callout),
//!   so the body callback continues the request;
//! - `hold-resp`: PAUSE from the response headers, likewise;
//! - `grow-req`: the request body gets `+grown` appended;
//! - `/deny`: a local reply (403, body `denied\n`) from the request headers.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Http::default()) });
}}

#[derive(Default)]
struct Http {
    path: String,
    late_req: Option<String>,
}

impl Context for Http {}

// The raw host calls: the SDK's wrappers trap on statuses other than OK,
// and the status is what this fixture reports.
extern "C" {
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// `add=<status>,get=<status>` of adding `name: 1` to map `map` and then
/// reading `name` back (0 OK, 1 NOT_FOUND, 2 BAD_ARGUMENT, ...).
fn late_edit(map: u32, name: &str) -> String {
    let value = "1";
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len: usize = 0;
    // SAFETY: pointers to live locals; the host allocates the answer with
    // the SDK's allocator, leaked here (a test fixture).
    let (add, get) = unsafe {
        (
            proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()),
            proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut ptr, &mut len),
        )
    };
    format!("add={add},get={get}")
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        if self.path.starts_with("/deny") {
            self.send_http_response(403, vec![("x-local", "1")], Some(b"denied\n"));
            return Action::Pause;
        }
        if self.path.contains("hold-req") {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        self.late_req = Some(late_edit(0, "x-late-req"));
        if self.path.contains("grow-req") {
            self.set_http_request_body(size, 0, b"+grown");
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let late = self.late_req.clone().unwrap_or_else(|| "none".to_string());
        self.set_http_response_header("x-late-req-status", Some(&late));
        let code = self.get_http_response_header(":status").unwrap_or_default();
        self.add_http_response_header("x-resp-seen", &code);
        if self.path.contains("hold-resp") {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        let note = format!("\n[late-resp:{}]", late_edit(2, "x-late-resp"));
        self.set_http_response_body(size, 0, note.as_bytes());
        Action::Continue
    }
}
