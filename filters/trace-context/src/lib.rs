//! # trace-context: W3C Trace Context (and B3) propagation
//!
//! On request headers this filter makes sure every request carries a valid
//! trace context and a request id, and records them for the rest of the
//! pipeline:
//!
//! * a valid incoming `traceparent` is **continued**: same trace id, a new
//!   span id for this hop (the incoming span becomes the parent), the
//!   incoming flags (so the caller's sampling decision) kept; `tracestate` is
//!   passed on unchanged;
//! * with no (or a malformed) `traceparent`, a **new trace** starts, sampled
//!   with probability `sample_ratio`; a malformed header's `tracestate` is
//!   dropped, as the spec requires;
//! * with `b3 = true`, a B3 context (`b3` single header, or `x-b3-traceid`,
//!   `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`) is continued when there is
//!   no valid `traceparent`, and the outgoing request carries both formats;
//! * `x-request-id` is generated (UUID v4) when absent (`request_id = true`).
//!
//! It sets the stream properties `wasp.trace_id` (32 hex), `wasp.span_id`
//! (16 hex, this hop's span), `wasp.parent_span_id` (when continuing) and
//! `wasp.sampled` (`1`/`0`), read by the access log and the OpenTelemetry
//! export.
//!
//! ```toml
//! [filters.trace]
//! module = "trace_context.wasm"
//! config = { sample_ratio = 0.1, b3 = true }
//! ```

#![warn(missing_docs)]

use std::rc::Rc;
use wasp_sdk::{props, random, Action, ConfigError, Filter, Request, Root};

/// The filter's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Probability of sampling a trace this filter starts (0.0..=1.0).
    #[serde(default = "one")]
    pub sample_ratio: f64,
    /// Read and write B3 headers too.
    #[serde(default)]
    pub b3: bool,
    /// Generate `x-request-id` when absent.
    #[serde(default = "yes")]
    pub request_id: bool,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// A trace context: ids and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Trace id (never all zero).
    pub trace_id: [u8; 16],
    /// Span id (never all zero).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl Context {
    /// True when the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` header value (version 00).
    ///
    /// ```
    /// use trace_context::Context;
    /// let c = Context { trace_id: [0xab; 16], span_id: [0x01; 8], flags: 1 };
    /// assert_eq!(c.traceparent(), "00-abababababababababababababababab-0101010101010101-01");
    /// ```
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 0xf)] as char);
    }
    s
}

/// Parses lower-case hex into `out` (exact length).
fn unhex(s: &str, out: &mut [u8]) -> bool {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return false;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        match (val(b[2 * i]), val(b[2 * i + 1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

/// Parses a `traceparent` per W3C Trace Context level 1: lower-case hex,
/// version `ff` invalid, version `00` exactly 55 chars, later versions may
/// append `-...`, all-zero ids invalid.
///
/// ```
/// use trace_context::parse_traceparent;
/// let c = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert!(c.sampled());
/// assert!(parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none());
/// assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// ```
pub fn parse_traceparent(value: &str) -> Option<Context> {
    let v = value.trim();
    if v.len() < 55 || !v.is_ascii() {
        return None;
    }
    let mut version = [0u8; 1];
    if !unhex(&v[0..2], &mut version) || version[0] == 0xff {
        return None;
    }
    if &v[2..3] != "-" || &v[35..36] != "-" || &v[52..53] != "-" {
        return None;
    }
    if version[0] == 0 && v.len() != 55 {
        return None;
    }
    if version[0] > 0 && v.len() > 55 && &v[55..56] != "-" {
        return None;
    }
    let mut c = Context {
        trace_id: [0; 16],
        span_id: [0; 8],
        flags: 0,
    };
    let mut flags = [0u8; 1];
    if !unhex(&v[3..35], &mut c.trace_id)
        || !unhex(&v[36..52], &mut c.span_id)
        || !unhex(&v[53..55], &mut flags)
    {
        return None;
    }
    c.flags = flags[0];
    if c.trace_id == [0; 16] || c.span_id == [0; 8] {
        return None;
    }
    Some(c)
}

/// A B3 trace id: 16 or 32 lower-case hex; 64-bit ids are left-padded.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    let ok = match s.len() {
        32 => unhex(s, &mut id),
        16 => unhex(s, &mut id[8..]),
        _ => false,
    };
    (ok && id != [0; 16]).then_some(id)
}

fn b3_span_id(s: &str) -> Option<[u8; 8]> {
    let mut id = [0u8; 8];
    (unhex(s, &mut id) && id != [0; 8]).then_some(id)
}

/// What B3 headers said: a context (when ids are present) and/or a
/// sampling decision (`None` = defer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct B3 {
    /// Ids and the sampled flag (when the decision was given).
    pub context: Option<Context>,
    /// The sampling decision, if any.
    pub sampled: Option<bool>,
}

fn b3_sampling(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Parses the B3 single header `{trace}-{span}[-{sampling}[-{parent}]]` or a
/// lone sampling decision (`0`, `1`, `d`).
///
/// ```
/// use trace_context::parse_b3_single;
/// let b = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap();
/// assert_eq!(b.sampled, Some(true));
/// assert!(b.context.is_some());
/// assert_eq!(parse_b3_single("0").unwrap().sampled, Some(false));
/// assert!(parse_b3_single("nonsense").is_none());
/// ```
pub fn parse_b3_single(value: &str) -> Option<B3> {
    let v = value.trim();
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() == 1 {
        return b3_sampling(parts[0]).map(|s| B3 {
            context: None,
            sampled: Some(s),
        });
    }
    if parts.len() > 4 {
        return None;
    }
    let trace_id = b3_trace_id(parts[0])?;
    let span_id = b3_span_id(parts[1])?;
    let sampled = match parts.get(2) {
        Some(s) => Some(b3_sampling(s)?),
        None => None,
    };
    if let Some(p) = parts.get(3) {
        b3_span_id(p)?;
    }
    Some(B3 {
        context: Some(Context {
            trace_id,
            span_id,
            flags: u8::from(sampled.unwrap_or(false)),
        }),
        sampled,
    })
}

/// Parses B3 multi headers (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`,
/// `x-b3-flags`).
pub fn parse_b3_multi(
    trace_id: Option<&str>,
    span_id: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<B3> {
    let decision = if flags.map(str::trim) == Some("1") {
        Some(true)
    } else {
        sampled.and_then(b3_sampling)
    };
    let context = match (trace_id, span_id) {
        (Some(t), Some(s)) => Some(Context {
            trace_id: b3_trace_id(t.trim())?,
            span_id: b3_span_id(s.trim())?,
            flags: u8::from(decision.unwrap_or(false)),
        }),
        (None, None) => None,
        _ => return None,
    };
    if context.is_none() && decision.is_none() {
        return None;
    }
    Some(B3 {
        context,
        sampled: decision,
    })
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    while id == [0u8; N] {
        random::fill(&mut id);
    }
    id
}

/// A random UUID v4 (`x-request-id`).
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    random::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Validated config.
#[derive(Debug)]
pub struct State {
    sample_ratio: f64,
    b3: bool,
    request_id: bool,
}

/// The trace-context filter.
pub struct TraceContext {
    state: Rc<State>,
}

impl TraceContext {
    fn sample(&self) -> bool {
        self.state.sample_ratio >= 1.0 || random::f64() < self.state.sample_ratio
    }

    /// Finds the incoming context: `(parent, decision)`.
    fn incoming(&self, req: &mut Request) -> (Option<Context>, Option<bool>) {
        if let Some(tp) = req.header("traceparent") {
            if let Some(c) = parse_traceparent(&tp) {
                return (Some(c), Some(c.sampled()));
            }
            wasp_sdk::debug!("malformed traceparent {tp:?}: starting a new trace");
            req.headers().remove("tracestate");
        }
        if !self.state.b3 {
            return (None, None);
        }
        let h = req.headers();
        let b3 = match h.get("b3") {
            Some(v) => parse_b3_single(&v),
            None => parse_b3_multi(
                h.get("x-b3-traceid").as_deref(),
                h.get("x-b3-spanid").as_deref(),
                h.get("x-b3-sampled").as_deref(),
                h.get("x-b3-flags").as_deref(),
            ),
        };
        match b3 {
            Some(b) => (b.context, b.sampled),
            None => (None, None),
        }
    }
}

impl Filter for TraceContext {
    type Config = Config;
    type State = State;

    fn configure(config: Config, _root: &mut Root) -> Result<State, ConfigError> {
        if !(0.0..=1.0).contains(&config.sample_ratio) {
            return Err(
                format!("sample_ratio: {} is outside 0.0..=1.0", config.sample_ratio).into(),
            );
        }
        Ok(State {
            sample_ratio: config.sample_ratio,
            b3: config.b3,
            request_id: config.request_id,
        })
    }

    fn new(state: &Rc<State>) -> Self {
        TraceContext {
            state: state.clone(),
        }
    }

    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        let (parent, decision) = self.incoming(req);
        let sampled = decision.unwrap_or_else(|| self.sample());
        let span_id = random_nonzero::<8>();
        let ctx = match parent {
            Some(p) => Context {
                trace_id: p.trace_id,
                span_id,
                flags: (p.flags & !1) | u8::from(sampled),
            },
            None => Context {
                trace_id: random_nonzero::<16>(),
                span_id,
                flags: u8::from(sampled),
            },
        };
        req.set_header("traceparent", &ctx.traceparent());
        let trace_hex = hex(&ctx.trace_id);
        let span_hex = hex(&ctx.span_id);
        let parent_hex = parent.map(|p| hex(&p.span_id));
        if self.state.b3 {
            let flag = if sampled { "1" } else { "0" };
            let single = match &parent_hex {
                Some(p) => format!("{trace_hex}-{span_hex}-{flag}-{p}"),
                None => format!("{trace_hex}-{span_hex}-{flag}"),
            };
            req.set_header("b3", &single);
            req.set_header("x-b3-traceid", &trace_hex);
            req.set_header("x-b3-spanid", &span_hex);
            req.set_header("x-b3-sampled", flag);
            req.remove_header("x-b3-flags");
            match &parent_hex {
                Some(p) => req.set_header("x-b3-parentspanid", p),
                None => req.remove_header("x-b3-parentspanid"),
            }
        }
        if self.state.request_id && req.header("x-request-id").is_none() {
            req.set_header("x-request-id", &uuid_v4());
        }
        let set = |k: &str, v: &str| {
            if let Err(e) = props::set(k, v) {
                wasp_sdk::debug!("cannot set {k}: {e}");
            }
        };
        set(props::WASP_TRACE_ID, &trace_hex);
        set(props::WASP_SPAN_ID, &span_hex);
        if let Some(p) = &parent_hex {
            set("wasp.parent_span_id", p);
        }
        set("wasp.sampled", if sampled { "1" } else { "0" });
        Action::Continue
    }
}

wasp_sdk::register!(TraceContext);

#[cfg(test)]
mod tests;
