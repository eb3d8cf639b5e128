//! [`Headers`]: a live view of one of the proxy's header maps (request or
//! response headers or trailers). Reads and writes go straight to the host;
//! nothing is cached in the guest, so what you read is what the next filter
//! will see.
//!
//! Names are case-insensitive the way the proxy treats them (HTTP/2 lower-case
//! names); pass lower-case names. Pseudo-headers (`:method`, `:path`,
//! `:authority`, `:status`) are in the maps too.

use crate::abi::MapType;
use crate::host;

/// A view of one header map. Get one from [`Request::headers`],
/// [`Request::trailers`], [`Response::headers`] or [`Response::trailers`].
///
/// Failed writes (the map is not available in this callback) are logged at
/// debug level and otherwise ignored: a filter should not trap because it
/// touched headers at the wrong time.
///
/// [`Request::headers`]: crate::Request::headers
/// [`Request::trailers`]: crate::Request::trailers
/// [`Response::headers`]: crate::Response::headers
/// [`Response::trailers`]: crate::Response::trailers
///
/// ```
/// # use wasp_sdk::Request;
/// fn tag(req: &mut Request) {
///     let h = req.headers();
///     if h.get("x-debug").is_none() {
///         h.set("x-debug", "0");
///     }
///     h.add("via", "wasp");
///     h.remove("x-internal");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    map: MapType,
}

impl Headers {
    pub(crate) fn new(map: MapType) -> Self {
        Self { map }
    }

    /// The value of `name`, if present (the first one if repeated).
    pub fn get(&self, name: &str) -> Option<String> {
        host::with(|h| h.map_value(self.map, name)).unwrap_or(None)
    }

    /// Every value of `name`, in order (for repeated headers such as `cookie`
    /// in HTTP/2 or `set-cookie`).
    pub fn get_all(&self, name: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// True when `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// All pairs, in order.
    pub fn all(&self) -> Vec<(String, String)> {
        host::with(|h| h.map_pairs(self.map)).unwrap_or_default()
    }

    /// Sets `name` to `value`, replacing any existing values.
    pub fn set(&self, name: &str, value: &str) {
        let r = host::with(|h| h.replace_map_value(self.map, name, value));
        self.note("set", name, r);
    }

    /// Adds a `name: value` pair, keeping existing values.
    pub fn add(&self, name: &str, value: &str) {
        let r = host::with(|h| h.add_map_value(self.map, name, value));
        self.note("add", name, r);
    }

    /// Removes every value of `name` (no-op when absent).
    pub fn remove(&self, name: &str) {
        let r = host::with(|h| h.remove_map_value(self.map, name));
        self.note("remove", name, r);
    }

    /// Replaces the whole map with `pairs`.
    pub fn set_all(&self, pairs: &[(&str, &str)]) {
        let r = host::with(|h| h.set_map_pairs(self.map, pairs));
        self.note("set_all", "*", r);
    }

    fn note(&self, op: &str, name: &str, r: Result<(), crate::Status>) {
        if let Err(s) = r {
            crate::debug!("header {op} {name:?} on {:?} failed: {s}", self.map);
        }
    }
}
