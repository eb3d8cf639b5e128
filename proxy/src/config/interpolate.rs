//! `${VAR}` interpolation for externalized configuration.
//!
//! Runs on the raw TOML text before parsing, so a value can come from the
//! environment anywhere a string can be written. Comments are left alone (an
//! example in a comment must not need its variable set). Variables come through
//! a lookup function rather than `std::env` directly so tests can pass a map.
//!
//! The scan walks bytes (multi-byte characters inside strings are stepped
//! over one byte at a time), so it compares bytes and only slices the text
//! at ASCII delimiters, which are always character boundaries.

/// Where a variable that cannot be pasted in was referenced.
#[derive(Debug, PartialEq, Eq)]
pub struct Unset {
    pub name: String,
    pub offset: usize,
    /// Set but holding a character that would end the literal (`'...'`)
    /// string it is pasted into; false: not set at all.
    pub unquotable: bool,
}

/// Maps positions in the interpolated text back to the file as written, so
/// an error after `${VAR}` on the same line still names the right column.
#[derive(Debug, Default, Clone)]
pub struct OffsetMap {
    /// Each replacement, in order: (start in the output, length in the
    /// output, start in the source, length in the source).
    edits: Vec<(usize, usize, usize, usize)>,
}

impl OffsetMap {
    /// The source offset of output offset `out`; inside a substituted
    /// value, the start of its `${...}`.
    pub fn source(&self, out: usize) -> usize {
        let mut delta: isize = 0;
        for &(o, o_len, s, s_len) in &self.edits {
            if out < o {
                break;
            }
            if out < o + o_len {
                return s;
            }
            delta = (s + s_len) as isize - (o + o_len) as isize;
        }
        out.saturating_add_signed(delta)
    }
}

/// Replaces every `${NAME}` outside comments with `lookup(NAME)`. `$${` is a
/// literal `${`.
#[cfg(test)]
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Unset> {
    interpolate_mapped(text, lookup).map(|(out, _)| out)
}

/// [`interpolate`], with the map from output positions to source positions.
pub fn interpolate_mapped(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, OffsetMap), Unset> {
    let bytes = text.as_bytes();
    let mut map = OffsetMap::default();
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
                if bytes[i..].starts_with(delim.as_bytes()) {
                    in_string = None;
                    i += delim.len();
                    continue;
                }
                if bytes[i..].starts_with(b"$${") {
                    out.push_str(&text[copied..i]);
                    map.edits.push((out.len(), 2, i, 3));
                    out.push_str("${");
                    i += 3;
                    copied = i;
                    continue;
                }
                if bytes[i..].starts_with(b"${") {
                    // `i` is on the ASCII `$`, so these slices start on
                    // character boundaries.
                    if let Some(end) = text[i + 2..].find('}') {
                        let name = &text[i + 2..i + 2 + end];
                        let value = lookup(name).ok_or_else(|| Unset {
                            name: name.to_string(),
                            offset: i,
                            unquotable: false,
                        })?;
                        let escaped = escape_for(delim, &value).ok_or_else(|| Unset {
                            name: name.to_string(),
                            offset: i,
                            unquotable: true,
                        })?;
                        out.push_str(&text[copied..i]);
                        map.edits.push((out.len(), escaped.len(), i, end + 3));
                        out.push_str(&escaped);
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
    Ok((out, map))
}

/// A value must not be able to end the string it is pasted into: in a
/// basic string it is escaped; a literal string has no escapes, so a value
/// that would end it (a quote, or a line break in a one-line string) is
/// refused (`None`) rather than pasted in as TOML.
fn escape_for(delim: &str, value: &str) -> Option<String> {
    if delim.starts_with('"') {
        let mut out = String::with_capacity(value.len());
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' if delim.len() == 1 => out.push_str("\\n"),
                '\r' if delim.len() == 1 => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        Some(out)
    } else if value.contains('\'') || (delim.len() == 1 && value.contains(['\n', '\r'])) {
        None
    } else {
        Some(value.to_string())
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
        assert!(!err.unquotable);
    }

    #[test]
    fn offsets_map_back_to_the_source() {
        let src = "a = \"${SERVICE}\" b\nc = \"$${x}\" d";
        let (out, map) = interpolate_mapped(src, env).unwrap();
        assert_eq!(out, "a = \"reviews\" b\nc = \"${x}\" d");
        let b_out = out.find(" b").unwrap();
        assert_eq!(map.source(b_out), src.find(" b").unwrap());
        assert_eq!(
            map.source(out.find("views").unwrap()),
            src.find("${").unwrap()
        );
        assert_eq!(map.source(out.find(" d").unwrap()), src.find(" d").unwrap());
        assert_eq!(map.source(2), 2);
    }

    #[test]
    fn a_value_cannot_end_a_literal_string() {
        let err = interpolate("a = '${QUOTE}x'", |_| Some("y' b = 'z".into())).unwrap_err();
        assert!(err.unquotable);
        let out = interpolate("a = \"${V}\"", |_| Some("l1\nl2".into())).unwrap();
        assert_eq!(out, "a = \"l1\\nl2\"");
    }

    #[test]
    fn non_ascii_strings_and_escapes_are_scanned_safely() {
        let text = "a = \"é ${SERVICE} ü\"\nb = '日本 ${SERVICE}'\nc = \"\\é\"\nd = \"\"\"ß\"\"\"";
        let out = interpolate(text, env).unwrap();
        assert!(
            out.contains("é reviews ü") && out.contains("日本 reviews"),
            "{out}"
        );
        // Every prefix of the text: never a panic, whatever is cut off.
        for end in (0..=text.len()).filter(|e| text.is_char_boundary(*e)) {
            let _ = interpolate(&text[..end], env);
        }
    }

    #[test]
    fn escapes_quotes_and_dollar_dollar() {
        let out = interpolate("a = \"${QUOTE} $${SERVICE}\"", env).unwrap();
        assert_eq!(out, "a = \"a\\\"b ${SERVICE}\"");
    }
}
