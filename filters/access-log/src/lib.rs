//! # access-log: one line per request
//!
//! At the end of each stream (`on_log`) this filter writes one line to the
//! proxy's log at info level: JSON by default, or a format string.
//!
//! ```toml
//! [filters.access_log]
//! module = "access_log.wasm"
//! config = { format = "json" }            # the default
//! # config = { format = "{method} {path} {status} {duration_ms}ms rid={request_id}" }
//! ```
//!
//! Fields (JSON keys and `{placeholders}`), from the properties in
//! `docs/filter-contract.md`: `method`, `path`, `authority`, `status`,
//! `duration_ms` (float, µs precision), `bytes_in`, `bytes_out`, `upstream`,
//! `listener`, `route`, `cluster`, `error` (`wasp.error`, the `x-wasp-error`
//! code), `request_id`, `trace_id` (`wasp.trace_id`). A missing value is JSON
//! `null`, or `-` in a format string. `{{` and `}}` are literal braces. An
//! unknown placeholder rejects the config, naming it.
//!
//! Cost: one property read per field used, one `proxy_log` per request.

#![warn(missing_docs)]

use std::rc::Rc;
use wasp_sdk::{ConfigError, Filter, Log, Root};

/// The filter's config (`config = { ... }` in wasp.toml).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `"json"` (default) or a format string with `{field}` placeholders.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_format() -> String {
    "json".to_string()
}

/// One log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `method`
    Method,
    /// `path`
    Path,
    /// `authority`
    Authority,
    /// `status`
    Status,
    /// `duration_ms`
    DurationMs,
    /// `bytes_in`
    BytesIn,
    /// `bytes_out`
    BytesOut,
    /// `upstream`
    Upstream,
    /// `listener`
    Listener,
    /// `route`
    Route,
    /// `cluster`
    Cluster,
    /// `error`
    Error,
    /// `request_id`
    RequestId,
    /// `trace_id`
    TraceId,
}

/// Every field, in JSON order.
pub const FIELDS: [Field; 14] = [
    Field::Method,
    Field::Path,
    Field::Authority,
    Field::Status,
    Field::DurationMs,
    Field::BytesIn,
    Field::BytesOut,
    Field::Upstream,
    Field::Listener,
    Field::Route,
    Field::Cluster,
    Field::Error,
    Field::RequestId,
    Field::TraceId,
];

impl Field {
    /// The JSON key / placeholder name.
    pub fn name(self) -> &'static str {
        match self {
            Field::Method => "method",
            Field::Path => "path",
            Field::Authority => "authority",
            Field::Status => "status",
            Field::DurationMs => "duration_ms",
            Field::BytesIn => "bytes_in",
            Field::BytesOut => "bytes_out",
            Field::Upstream => "upstream",
            Field::Listener => "listener",
            Field::Route => "route",
            Field::Cluster => "cluster",
            Field::Error => "error",
            Field::RequestId => "request_id",
            Field::TraceId => "trace_id",
        }
    }

    fn parse(name: &str) -> Option<Field> {
        FIELDS.iter().copied().find(|f| f.name() == name)
    }
}

/// A value read at log time.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Missing,
    Text(String),
    Int(u64),
    /// Microseconds, printed as milliseconds with three decimals.
    Micros(u64),
}

fn read(log: &Log, field: Field) -> Value {
    let text = |v: Option<String>| v.map_or(Value::Missing, Value::Text);
    let int = |v: Option<u64>| v.map_or(Value::Missing, Value::Int);
    match field {
        Field::Method => text(log.method()),
        Field::Path => text(log.path()),
        Field::Authority => text(log.authority()),
        Field::Status => int(log.status().map(u64::from)),
        Field::DurationMs => log.duration().map_or(Value::Missing, |d| {
            Value::Micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        }),
        Field::BytesIn => int(log.bytes_in()),
        Field::BytesOut => int(log.bytes_out()),
        Field::Upstream => text(log.upstream()),
        Field::Listener => text(log.listener()),
        Field::Route => text(log.route()),
        Field::Cluster => text(log.cluster()),
        Field::Error => text(log.error()),
        Field::RequestId => text(log.request_id()),
        Field::TraceId => text(log.trace_id()),
    }
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text.
    Lit(String),
    /// A placeholder.
    Field(Field),
}

/// Parses a format string into pieces, rejecting unknown placeholders.
///
/// ```
/// use access_log::{parse_format, Piece, Field};
/// let p = parse_format("{method} {{x}}").unwrap();
/// assert_eq!(p, vec![Piece::Field(Field::Method), Piece::Lit(" {x}".into())]);
/// assert!(parse_format("{nope}").unwrap_err().to_string().contains("nope"));
/// ```
pub fn parse_format(fmt: &str) -> Result<Vec<Piece>, ConfigError> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => {
                            return Err(ConfigError::new(format!(
                                "format: unclosed '{{' before {name:?}"
                            )))
                        }
                    }
                }
                let field = Field::parse(name.trim()).ok_or_else(|| {
                    let known: Vec<&str> = FIELDS.iter().map(|f| f.name()).collect();
                    ConfigError::new(format!(
                        "format: unknown field {{{name}}}; known fields: {}",
                        known.join(", ")
                    ))
                })?;
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                out.push(Piece::Field(field));
            }
            '}' => return Err(ConfigError::new("format: unmatched '}' (write '}}')")),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    Ok(out)
}

/// How lines are written.
#[derive(Debug)]
pub enum Format {
    /// One JSON object per line with every field.
    Json,
    /// A format string.
    Template(Vec<Piece>),
}

/// The access-log filter.
pub struct AccessLog {
    format: Rc<Format>,
}

impl Filter for AccessLog {
    type Config = Config;
    type State = Format;

    fn configure(config: Config, _root: &mut Root) -> Result<Format, ConfigError> {
        match config.format.as_str() {
            "json" => Ok(Format::Json),
            "" => Err(ConfigError::new(
                "format: must be \"json\" or a format string",
            )),
            f => parse_format(f).map(Format::Template),
        }
    }

    fn new(state: &Rc<Format>) -> Self {
        AccessLog {
            format: state.clone(),
        }
    }

    fn on_log(&mut self, log: &Log) {
        let line = match &*self.format {
            Format::Json => json_line(log),
            Format::Template(pieces) => template_line(log, pieces),
        };
        wasp_sdk::info!("{line}");
    }
}

fn json_line(log: &Log) -> String {
    let mut s = String::with_capacity(320);
    s.push('{');
    for (i, f) in FIELDS.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        s.push_str(f.name());
        s.push_str("\":");
        match read(log, *f) {
            Value::Missing => s.push_str("null"),
            Value::Int(n) => s.push_str(&n.to_string()),
            Value::Micros(us) => push_millis(&mut s, us),
            Value::Text(t) => push_json_string(&mut s, &t),
        }
    }
    s.push('}');
    s
}

fn template_line(log: &Log, pieces: &[Piece]) -> String {
    let mut s = String::with_capacity(160);
    for p in pieces {
        match p {
            Piece::Lit(l) => s.push_str(l),
            Piece::Field(f) => match read(log, *f) {
                Value::Missing => s.push('-'),
                Value::Int(n) => s.push_str(&n.to_string()),
                Value::Micros(us) => push_millis(&mut s, us),
                Value::Text(t) => s.push_str(&t),
            },
        }
    }
    s
}

/// Writes `us` microseconds as milliseconds with three decimals (`42.250`),
/// without pulling float formatting into the module.
fn push_millis(s: &mut String, us: u64) {
    s.push_str(&(us / 1000).to_string());
    s.push('.');
    let frac = us % 1000;
    if frac < 100 {
        s.push('0');
    }
    if frac < 10 {
        s.push('0');
    }
    s.push_str(&frac.to_string());
}

/// Appends `t` as a JSON string literal.
fn push_json_string(s: &mut String, t: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let b = c as u8;
                s.push_str("\\u00");
                s.push(HEX[usize::from(b >> 4)] as char);
                s.push(HEX[usize::from(b & 0xf)] as char);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

wasp_sdk::register!(AccessLog);

#[cfg(test)]
mod tests;
