//! The request path and host as routes compare them, when a listener's
//! routes decide which filters run (per-route pipelines): the same request
//! spelled two ways must not reach two routes. Like Envoy's
//! `normalize_path` + `merge_slashes` + `strip_trailing_host_dot` (Istio's
//! `NORMALIZE_AND_MERGE_SLASHES`): percent-encoded unreserved characters
//! are decoded, dot segments removed (RFC 3986 section 5.2.4), runs of `/`
//! merged, and one trailing dot dropped from the host. An encoded `/` or
//! `\`, a raw `\`, or a `..` above the root is refused: an upstream could
//! read those as a path the routes never saw.
//!
//! Pure functions on strings; `forward::phases` applies them to the
//! request it then forwards, so the upstream sees the path the route saw.

use std::borrow::Cow;

/// Why a path cannot be normalised (the request is answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: a separator the routes would not see as one.
    EncodedSeparator,
    /// A raw `\`, which some upstreams read as `/`.
    Backslash,
    /// More `..` segments than there are segments above them.
    EscapesRoot,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::EncodedSeparator => "the path has an encoded '/' or '\\' (%2F, %5C)",
            PathError::Backslash => "the path has a '\\'",
            PathError::EscapesRoot => "the path's '..' segments go above the root",
        })
    }
}

/// `path` (no query) normalised; borrowed when it already is. A path not
/// starting with `/` (`*`, or none) is left as it is.
pub fn path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // `decoded` starts with '/': the first piece of the split is empty.
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            // Merged slashes, and `.`: nothing to keep.
            "" | "." => trailing_slash = last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
                trailing_slash = last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// The fast check: nothing in `path` that [`path`] would change.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.iter().any(|&c| c == b'%' || c == b'\\') {
        return false;
    }
    !path.contains("//")
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..")
}

/// Decodes `%XX` of unreserved characters (RFC 3986: ALPHA DIGIT - . _ ~),
/// keeps other escapes as they are, refuses encoded separators and `\`.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let decoded = match (b.get(i + 1), b.get(i + 2)) {
                    (Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h << 4) | l),
                    _ => None,
                };
                match decoded {
                    Some(b'/' | b'\\') => return Err(PathError::EncodedSeparator),
                    Some(d)
                        if d.is_ascii_alphanumeric() || matches!(d, b'-' | b'.' | b'_' | b'~') =>
                    {
                        out.push(char::from(d));
                        i += 3;
                    }
                    // Other escapes (and a stray '%') stay as sent.
                    _ => {
                        out.push('%');
                        i += 1;
                    }
                }
            }
            _ => {
                // Request targets are ASCII (hyper refuses the rest);
                // a non-ASCII byte is kept by going through the str.
                let ch = path
                    .get(i..)
                    .and_then(|s| s.chars().next())
                    .unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8().max(1);
            }
        }
    }
    Ok(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `host` (which may carry a port) without one trailing dot on its name:
/// `admin.example.` and `admin.example.:8080` name `admin.example`.
pub fn host(host: &str) -> Cow<'_, str> {
    if let Some(name) = host.strip_suffix('.') {
        return Cow::Borrowed(name);
    }
    if !host.starts_with('[') {
        if let Some((name, port)) = host.rsplit_once(':') {
            if let Some(name) = name.strip_suffix('.') {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    return Cow::Owned(format!("{name}:{port}"));
                }
            }
        }
    }
    Cow::Borrowed(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_like_envoy_normalize_and_merge_slashes() {
        for (sent, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2e/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c/", "/a/b/c/"),
            ("/a/./b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/%61dmin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%zz", "/a%zz"),
            ("/100%", "/100%"),
            ("*", "*"),
        ] {
            assert_eq!(path(sent).as_deref(), Ok(want), "{sent}");
        }
        assert!(matches!(path("/a/b"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn separators_in_disguise_and_escapes_above_the_root_are_refused() {
        for (sent, want) in [
            ("/public%2F..%2Fadmin", PathError::EncodedSeparator),
            ("/public%2f..", PathError::EncodedSeparator),
            ("/public%5cadmin", PathError::EncodedSeparator),
            ("/public\\..\\admin", PathError::Backslash),
            ("/..", PathError::EscapesRoot),
            ("/a/../../admin", PathError::EscapesRoot),
            ("/%2e%2e/admin", PathError::EscapesRoot),
        ] {
            assert_eq!(path(sent), Err(want), "{sent}");
        }
    }

    #[test]
    fn one_trailing_host_dot_is_dropped() {
        for (sent, want) in [
            ("admin.example.", "admin.example"),
            ("admin.example.:8080", "admin.example:8080"),
            ("admin.example", "admin.example"),
            ("admin.example:8080", "admin.example:8080"),
            ("[::1]:80", "[::1]:80"),
            ("", ""),
        ] {
            assert_eq!(host(sent), want, "{sent}");
        }
    }
}
