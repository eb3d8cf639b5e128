//! The Proxy-Wasm ABI v0.2.1 as plain data: status codes, enum values, and the
//! wire formats (serialized header maps, NUL-joined property paths).
//!
//! Everything here is target-independent and unit-tested on the host. The two
//! wasm-only submodules own the `unsafe` boundary with the host:
//! [`imports`] declares the `env.proxy_*` functions and wraps them as the
//! [`crate::host::Host`] implementation used in a real VM, and [`exports`]
//! defines the `proxy_on_*` callbacks the host calls. Nothing else in the SDK
//! touches raw pointers.
//!
//! Numbers come from the spec (`proxy-wasm/spec`, `abi-versions/v0.2.1`).

#[cfg(target_arch = "wasm32")]
pub(crate) mod exports;
#[cfg(target_arch = "wasm32")]
pub(crate) mod imports;

use std::fmt;

/// A `proxy_status_t` returned by a host function.
///
/// You meet it inside [`crate::HostError`] when a host call fails.
///
/// ```
/// use wasp_sdk::Status;
/// assert_eq!(Status::from_code(8), Status::CasMismatch);
/// assert_eq!(Status::NotFound.to_string(), "NOT_FOUND");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `OK` (0).
    Ok,
    /// `NOT_FOUND` (1).
    NotFound,
    /// `BAD_ARGUMENT` (2), e.g. an HTTP callout to an unknown cluster.
    BadArgument,
    /// `SERIALIZATION_FAILURE` (3).
    SerializationFailure,
    /// `PARSE_FAILURE` (4).
    ParseFailure,
    /// `INVALID_MEMORY_ACCESS` (6).
    InvalidMemoryAccess,
    /// `EMPTY` (7).
    Empty,
    /// `CAS_MISMATCH` (8): a shared-data write lost a compare-and-swap race.
    CasMismatch,
    /// `INTERNAL_FAILURE` (10).
    InternalFailure,
    /// `UNIMPLEMENTED` (12).
    Unimplemented,
    /// Any code the spec does not name.
    Other(u32),
}

impl Status {
    /// Maps a raw `proxy_status_t` to a [`Status`].
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            6 => Status::InvalidMemoryAccess,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        }
    }

    /// The raw `proxy_status_t` value.
    pub fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::NotFound => 1,
            Status::BadArgument => 2,
            Status::SerializationFailure => 3,
            Status::ParseFailure => 4,
            Status::InvalidMemoryAccess => 6,
            Status::Empty => 7,
            Status::CasMismatch => 8,
            Status::InternalFailure => 10,
            Status::Unimplemented => 12,
            Status::Other(c) => c,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("OK"),
            Status::NotFound => f.write_str("NOT_FOUND"),
            Status::BadArgument => f.write_str("BAD_ARGUMENT"),
            Status::SerializationFailure => f.write_str("SERIALIZATION_FAILURE"),
            Status::ParseFailure => f.write_str("PARSE_FAILURE"),
            Status::InvalidMemoryAccess => f.write_str("INVALID_MEMORY_ACCESS"),
            Status::Empty => f.write_str("EMPTY"),
            Status::CasMismatch => f.write_str("CAS_MISMATCH"),
            Status::InternalFailure => f.write_str("INTERNAL_FAILURE"),
            Status::Unimplemented => f.write_str("UNIMPLEMENTED"),
            Status::Other(c) => write!(f, "status {c}"),
        }
    }
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MapType {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
    HttpCallResponseHeaders = 6,
    HttpCallResponseTrailers = 7,
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BufferType {
    RequestBody = 0,
    ResponseBody = 1,
    HttpCallResponseBody = 4,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the harness fills it
    VmConfiguration = 6,
    PluginConfiguration = 7,
}

/// `proxy_stream_type_t` (HTTP only; the SDK does not do TCP filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamType {
    Request = 0,
    Response = 1,
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

/// `proxy_action_t`: CONTINUE.
pub(crate) const ACTION_CONTINUE: u32 = 0;
/// `proxy_action_t`: PAUSE.
pub(crate) const ACTION_PAUSE: u32 = 1;

/// Serializes header pairs the ABI way: u32 count, a (key len, value len) pair
/// per entry, then each key and value followed by a NUL byte (little-endian).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn serialize_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let data_len: usize = pairs
        .iter()
        .map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data_len);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Parses a serialized header map. Malformed input yields the pairs that could
/// be read (never a panic): a guest must not trap on a host's odd encoding.
/// Non-UTF-8 bytes are replaced (U+FFFD).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn deserialize_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    let read_u32 = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let Some(count) = read_u32(0) else {
        return Vec::new();
    };
    let mut sizes = Vec::with_capacity(count.min(256));
    for i in 0..count {
        match (read_u32(4 + i * 8), read_u32(8 + i * 8)) {
            (Some(k), Some(v)) => sizes.push((k, v)),
            _ => return Vec::new(),
        }
    }
    let mut pos = 4 + count * 8;
    let mut out = Vec::with_capacity(sizes.len());
    for (klen, vlen) in sizes {
        let Some(k) = bytes.get(pos..pos + klen) else {
            break;
        };
        pos += klen + 1;
        let Some(v) = bytes.get(pos..pos + vlen) else {
            break;
        };
        pos += vlen + 1;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    out
}

/// Encodes a dotted property name (`request.path`, `wasp.cluster`) as the
/// ABI's NUL-joined segment path (`request\0path`). Names without dots
/// (`listener_name`) are one segment.
pub(crate) fn encode_path(dotted: &str) -> Vec<u8> {
    dotted.replace('.', "\0").into_bytes()
}

/// Encodes explicit segments (for names that contain dots themselves).
pub(crate) fn encode_segments(segments: &[&str]) -> Vec<u8> {
    segments.join("\0").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = vec![("a", "1"), ("b", "22"), (":path", "/x?y=z")];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(&bytes[0..4], &3u32.to_le_bytes());
        let back = deserialize_pairs(&bytes);
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn spec_example_encoding() {
        // {{"a": "1"}, {"b": "22"}} from the spec's Serialization section.
        let bytes = serialize_pairs(&[("a", "1"), ("b", "22")]);
        let mut want = Vec::new();
        for n in [2u32, 1, 1, 1, 2] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        want.extend_from_slice(b"a\x001\x00b\x0022\x00");
        assert_eq!(bytes, want);
    }

    #[test]
    fn empty_and_malformed_maps() {
        assert!(deserialize_pairs(&[]).is_empty());
        assert!(deserialize_pairs(&[0]).is_empty());
        assert!(deserialize_pairs(&serialize_pairs::<&str, &str>(&[])).is_empty());
        // Count says 5 but only one size pair follows.
        let mut bad = 5u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&1u32.to_le_bytes());
        assert!(deserialize_pairs(&bad).is_empty());
        // Truncated data keeps the complete pairs.
        let mut bytes = serialize_pairs(&[("a", "1"), ("bb", "22")]);
        bytes.truncate(bytes.len() - 3);
        assert_eq!(deserialize_pairs(&bytes), vec![("a".into(), "1".into())]);
    }

    #[test]
    fn property_paths() {
        assert_eq!(encode_path("request.path"), b"request\0path");
        assert_eq!(encode_path("listener_name"), b"listener_name");
        assert_eq!(encode_segments(&["a.b", "c"]), b"a.b\0c");
    }

    #[test]
    fn status_codes_round_trip() {
        for c in 0..16 {
            assert_eq!(Status::from_code(c).code(), c);
        }
    }
}
