//! `${VAR}` interpolation for externalized configuration.
//!
//! Runs on the raw TOML text before parsing, so a value can come from the
//! environment anywhere a string can be written. Comments are left alone (an
//! example in a comment must not need its variable set). Variables come through
//! a lookup function rather than `std::env` directly so tests can pass a map.

/// Where an unset variable was referenced.
#[derive(Debug, PartialEq, Eq)]
pub struct Unset {
    pub name: String,
    pub offset: usize,
}

/// Replaces every `${NAME}` outside comments with `lookup(NAME)`. `$${` is a
/// literal `${`.
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Unset> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    let mut in_string: Option<&'static str> = None;
    while i < bytes.len() {
        match in_string {
            None => match bytes[i] {
                b'#' => {
                    // Skip the comment up to the end of the line.
                    while i < bytes.len() && bytes[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                b'"' | b'\'' => {
                    let quote = if bytes[i] == b'"' { "\"" } else { "'" };
                    let triple = if quote == "\"" { "\"\"\"" } else { "'''" };
                    if bytes[i..].starts_with(triple.as_bytes()) {
                        in_string = Some(triple);
                        i += 3;
                    } else {
                        in_string = Some(quote);
                        i += 1;
                    }
                    continue;
                }
                _ => {}
            },
            Some(delim) => {
                if bytes[i] == b'\\' && delim.starts_with('"') {
                    i += 2;
                    continue;
                }
                // Byte comparisons: an escape (`\\` then any byte) can
                // leave `i` inside a multi-byte character, where slicing
                // the `str` would panic.
                if bytes[i..].starts_with(delim.as_bytes()) {
                    in_string = None;
                    i += delim.len();
                    continue;
                }
                if bytes[i..].starts_with(b"$${") {
                    out.push_str(&text[copied..i]);
                    out.push_str("${");
                    i += 3;
                    copied = i;
                    continue;
                }
                if bytes[i..].starts_with(b"${") {
                    let name_at = i + 2;
                    let end = bytes[name_at..].iter().position(|b| *b == b'}');
                    // `${` and `}` are ASCII, so both ends are char boundaries.
                    if let Some(name) = end.and_then(|end| text.get(name_at..name_at + end)) {
                        let end = name.len();
                        let value = lookup(name).ok_or_else(|| Unset {
                            name: name.to_string(),
                            offset: i,
                        })?;
                        out.push_str(&text[copied..i]);
                        out.push_str(&escape_for(delim, &value));
                        i += end + 3;
                        copied = i;
                        continue;
                    }
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied.min(text.len())..]);
    Ok(out)
}

/// A value must not be able to end the string it is pasted into.
fn escape_for(delim: &str, value: &str) -> String {
    if delim.starts_with('"') {
        value.replace('\\', "\\\\").replace('"', "\\\"")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SERVICE" => Some("reviews".into()),
            "QUOTE" => Some("a\"b".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_in_strings() {
        let out = interpolate("name = \"svc-${SERVICE}\"\n", env).unwrap();
        assert_eq!(out, "name = \"svc-reviews\"\n");
    }

    #[test]
    fn leaves_comments_alone() {
        let out = interpolate("# uses ${NOPE}\na = 'x' # ${NOPE}\n", env).unwrap();
        assert_eq!(out, "# uses ${NOPE}\na = 'x' # ${NOPE}\n");
    }

    #[test]
    fn unset_is_an_error_with_offset() {
        let err = interpolate("a = 1\nb = \"${MISSING}\"", env).unwrap_err();
        assert_eq!(err.name, "MISSING");
        assert_eq!(err.offset, 11);
    }

    #[test]
    fn escapes_quotes_and_dollar_dollar() {
        let out = interpolate("a = \"${QUOTE} $${SERVICE}\"", env).unwrap();
        assert_eq!(out, "a = \"a\\\"b ${SERVICE}\"");
    }
}
