//! The connection guard's HTTP/1 head checks, as pure functions: what a
//! request head says about its framing, and a [`Scanner`] that follows a
//! connection's bytes head by head (skipping each body it can measure) so
//! every head is checked, including heads pipelined behind a request that
//! is still in flight.
//!
//! What it refuses (hyper accepts these, a proxy must not):
//! - `Content-Length` together with `Transfer-Encoding` (hyper drops the
//!   length and carries on: the classic request smuggling shape);
//! - `Content-Length` values that disagree (hyper refuses these too);
//! - a head over the listener's `max_header_bytes` (hyper's own buffer
//!   limit cannot go below 8 KiB).
//!
//! Lines end in CRLF or a bare LF, as httparse (hyper's parser) accepts
//! both. What it leaves to hyper, which answers 400 itself: invalid tokens
//! and characters, obsolete line folding, a header line without a colon,
//! an unparsable `Content-Length`, a `Transfer-Encoding` whose last coding
//! is not `chunked`. After such a head, and after a chunked body it cannot
//! follow, the scanner stops ([`State::Opaque`]): hyper refuses it and
//! closes the connection, so nothing it could still check would reach an
//! upstream as a request.
//!
//! `Upgrade` and `CONNECT` heads are framed like any other: wasp answers
//! every `CONNECT` itself (400) and an upgrade the upstream refuses leaves
//! an HTTP connection, whose next heads are checked. An accepted upgrade
//! turns the guard into a passthrough before the 101 is written, and a
//! client sends tunnel bytes only after the 101 (RFC 6455, RFC 9113 3.2).
//!
//! No allocation except the bytes of a head that spans reads; every scan is
//! incremental, so a head arriving a byte at a time costs linear time.

/// Why the guard refuses a request head itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 400: framing a proxy must not pass on.
    Framing(&'static str),
    /// 431: over the listener's `max_header_bytes`.
    TooLarge,
}

/// The body that follows a head, as hyper will frame it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyLen {
    /// `Content-Length` (0 without one).
    Length(u64),
    Chunked,
    /// The bytes after the head are not followed: hyper refuses the head.
    Opaque,
}

/// What [`check_head`] says about the head at the start of some bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No blank line yet, and what there is fits the limit.
    Incomplete,
    /// A complete head of `len` bytes (empty lines before it included).
    Head { len: usize, body: BodyLen },
    /// Refused by the guard.
    Refuse(Refusal),
}

/// Checks the request head at the start of `bytes` (a head no longer than
/// `max_head` bytes, its leading empty lines not counted).
pub(super) fn check_head(bytes: &[u8], max_head: usize) -> Verdict {
    let skip = leading_empty_lines(bytes);
    let head = &bytes[skip..];
    let mut end = EndScan::default();
    match end.feed(head) {
        Some(len) if len > max_head => Verdict::Refuse(Refusal::TooLarge),
        Some(len) => match framing(&head[..len]) {
            Ok(body) => Verdict::Head {
                len: skip + len,
                body,
            },
            Err(problem) => Verdict::Refuse(Refusal::Framing(problem)),
        },
        None if head.len() > max_head => Verdict::Refuse(Refusal::TooLarge),
        None => Verdict::Incomplete,
    }
}

/// The empty lines a client may send before a request line (hyper skips
/// them).
fn leading_empty_lines(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(bytes.len())
}

/// Finds the blank line that ends a head, resuming where the last call
/// stopped.
#[derive(Clone, Copy, Debug, Default)]
struct EndScan {
    /// Where the line being scanned starts.
    line_start: usize,
    /// Bytes already scanned.
    scanned: usize,
}

impl EndScan {
    /// `head` is the head so far (its first `self.scanned` bytes already
    /// scanned); returns the head's length once its blank line is there.
    fn feed(&mut self, head: &[u8]) -> Option<usize> {
        let new = head.get(self.scanned..)?;
        for i in memchr::memchr_iter(b'\n', new) {
            let at = self.scanned + i;
            let line = head.get(self.line_start..at).unwrap_or_default();
            // The request line is never empty (empty lines before it are
            // skipped), so an empty line here ends the head.
            if self.line_start > 0 && (line.is_empty() || line == b"\r") {
                self.scanned = at + 1;
                return Some(at + 1);
            }
            self.line_start = at + 1;
        }
        self.scanned = head.len();
        None
    }
}

/// Splits a head into lines without their line ending (as
/// `split(|b| *b == b'\n')` would, the empty piece after a final LF too).
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(head);
    std::iter::from_fn(move || {
        let r = rest?;
        let line = match memchr::memchr(b'\n', r) {
            Some(i) => {
                rest = r.get(i + 1..);
                r.get(..i).unwrap_or_default()
            }
            None => {
                rest = None;
                r
            }
        };
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The body framing of a complete head (`head` ends with its blank line),
/// as hyper will decide it, or the guard's reason to refuse it.
fn framing(head: &[u8]) -> Result<BodyLen, &'static str> {
    let mut lines = lines(head).skip(1);
    let mut length: Option<u64> = None;
    let mut malformed = false;
    let mut chunked = None;
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            // Obsolete line folding: hyper refuses it.
            malformed = true;
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            malformed = true;
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|b| *b == b',') {
                match parse_length(trim(item)) {
                    Some(n) if length.is_some_and(|l| l != n) => {
                        return Err("conflicting Content-Length values")
                    }
                    Some(n) => length = Some(n),
                    None => malformed = true,
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding of the last line decides (hyper reads them in
            // order); hyper refuses a request whose last is not chunked.
            let last = value.rsplit(|b| *b == b',').next().map(trim);
            chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
        }
    }
    if chunked.is_some() && (length.is_some() || malformed && has_length_name(head)) {
        return Err("both Content-Length and Transfer-Encoding are set");
    }
    if malformed || chunked == Some(false) {
        return Ok(BodyLen::Opaque);
    }
    Ok(match chunked {
        Some(_) => BodyLen::Chunked,
        None => BodyLen::Length(length.unwrap_or(0)),
    })
}

/// Whether any header line is named Content-Length (used when its value
/// did not parse, so TE with an invalid CL is still the smuggling shape).
fn has_length_name(head: &[u8]) -> bool {
    lines(head).skip(1).any(|l| {
        memchr::memchr(b':', l).is_some_and(|c| l[..c].eq_ignore_ascii_case(b"content-length"))
    })
}

/// A `Content-Length` value: ASCII digits only (leading zeros too, as
/// hyper reads them), no sign, fits u64.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Where the scanner is in a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Expecting (or inside) a request head.
    Head,
    /// Inside a body with this many bytes left.
    Body(u64),
    Chunked(Chunk),
    /// Not following any more (see the module docs).
    Opaque,
}

/// Where the scanner is inside a chunked body (hyper's own states,
/// simplified: anything hyper would refuse makes the scanner stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    Size {
        size: u64,
        digits: bool,
    },
    SizeWs {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: a CR starts the end, anything else a trailer.
    EndCr,
    EndLf,
    /// Inside a trailer line (only CR LF ends it, as in hyper).
    Trailer,
    TrailerLf,
}

/// Follows one connection's bytes head by head.
#[derive(Debug)]
pub(super) struct Scanner {
    state: State,
    /// The current head so far, while it spans reads.
    head: Vec<u8>,
    end: EndScan,
    max_head: usize,
}

impl Scanner {
    pub(super) fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            end: EndScan::default(),
            max_head,
        }
    }

    #[cfg(test)]
    pub(super) fn state(&self) -> State {
        self.state
    }

    /// Feeds the next bytes of the connection. On a refused head, returns
    /// where in `bytes` that head begins (0 when it began in an earlier
    /// read) and why; the scanner then stops.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<(usize, Refusal)> {
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match self.state {
                State::Opaque => return None,
                State::Body(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    at += take;
                    let left = left.saturating_sub(take as u64);
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::Chunked(chunk) => {
                    let (used, next) = chunk_step(chunk, rest);
                    at += used;
                    self.state = next;
                }
                State::Head => {
                    let began = if self.head.is_empty() { at } else { 0 };
                    match self.head_step(rest) {
                        Step::More => return None,
                        Step::Done { used, body } => {
                            at += used;
                            self.state = match body {
                                BodyLen::Length(0) => State::Head,
                                BodyLen::Length(n) => State::Body(n),
                                BodyLen::Chunked => State::Chunked(Chunk::Size {
                                    size: 0,
                                    digits: false,
                                }),
                                BodyLen::Opaque => State::Opaque,
                            };
                        }
                        Step::Refused(r) => {
                            self.state = State::Opaque;
                            self.head = Vec::new();
                            return Some((began, r));
                        }
                    }
                }
            }
        }
        None
    }

    /// Takes head bytes from `rest`.
    fn head_step(&mut self, rest: &[u8]) -> Step {
        if self.head.is_empty() {
            // Empty lines between requests start no head.
            let skipped = leading_empty_lines(rest);
            if skipped == rest.len() {
                return Step::More;
            }
            // The whole head in this read (the common case): no copy.
            return match check_head(rest, self.max_head) {
                Verdict::Head { len, body } => Step::Done { used: len, body },
                Verdict::Refuse(r) => Step::Refused(r),
                Verdict::Incomplete => {
                    self.head.extend_from_slice(&rest[skipped..]);
                    let mut end = EndScan::default();
                    let _ = end.feed(&self.head);
                    self.end = end;
                    Step::More
                }
            };
        }
        let had = self.head.len();
        // Never hold more than the limit (plus one read's worth to see it).
        let room = self.max_head.saturating_add(1).saturating_sub(had);
        let take = rest.len().min(room.max(1));
        self.head.extend_from_slice(&rest[..take]);
        let mut end = self.end;
        let found = end.feed(&self.head);
        self.end = end;
        match found {
            Some(len) => {
                let head = std::mem::take(&mut self.head);
                self.end = EndScan::default();
                self.complete(&head[..len], len.saturating_sub(had))
            }
            None if self.head.len() > self.max_head => {
                self.head = Vec::new();
                Step::Refused(Refusal::TooLarge)
            }
            None => Step::More,
        }
    }

    fn complete(&self, head: &[u8], used: usize) -> Step {
        if head.len() > self.max_head {
            return Step::Refused(Refusal::TooLarge);
        }
        match framing(head) {
            Ok(body) => Step::Done { used, body },
            Err(problem) => Step::Refused(Refusal::Framing(problem)),
        }
    }
}

enum Step {
    More,
    Done { used: usize, body: BodyLen },
    Refused(Refusal),
}

/// Advances a chunked body over `bytes`: how many it used and the state
/// after them (`Head` once the body ended, `Opaque` on anything hyper
/// would refuse).
fn chunk_step(mut chunk: Chunk, bytes: &[u8]) -> (usize, State) {
    let mut i = 0;
    while i < bytes.len() {
        if let Chunk::Data(left) = chunk {
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(bytes.len() - i);
            i += take;
            let left = left.saturating_sub(take as u64);
            chunk = if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            };
            continue;
        }
        let b = bytes[i];
        i += 1;
        let next = match chunk {
            Chunk::Size { size, digits } => match hex(b) {
                Some(d) => size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(d)))
                    .map(|size| Chunk::Size { size, digits: true }),
                None if !digits => None,
                None => match b {
                    b' ' | b'\t' => Some(Chunk::SizeWs { size }),
                    b';' => Some(Chunk::Extension { size }),
                    b'\r' => Some(Chunk::SizeLf { size }),
                    _ => None,
                },
            },
            Chunk::SizeWs { size } => match b {
                b' ' | b'\t' => Some(Chunk::SizeWs { size }),
                b';' => Some(Chunk::Extension { size }),
                b'\r' => Some(Chunk::SizeLf { size }),
                _ => None,
            },
            Chunk::Extension { size } => match b {
                b'\r' => Some(Chunk::SizeLf { size }),
                b'\n' => None,
                _ => Some(Chunk::Extension { size }),
            },
            Chunk::SizeLf { size } => match b {
                b'\n' if size == 0 => Some(Chunk::EndCr),
                b'\n' => Some(Chunk::Data(size)),
                _ => None,
            },
            Chunk::Data(_) => None, // handled above
            Chunk::DataCr => (b == b'\r').then_some(Chunk::DataLf),
            Chunk::DataLf => (b == b'\n').then_some(Chunk::Size {
                size: 0,
                digits: false,
            }),
            Chunk::EndCr if b == b'\r' => Some(Chunk::EndLf),
            Chunk::EndCr | Chunk::Trailer if b != b'\r' => Some(Chunk::Trailer),
            Chunk::Trailer => Some(Chunk::TrailerLf),
            Chunk::EndCr => None,
            Chunk::EndLf if b == b'\n' => return (i, State::Head),
            Chunk::EndLf => None,
            Chunk::TrailerLf => (b == b'\n').then_some(Chunk::EndCr),
        };
        match next {
            Some(n) => chunk = n,
            None => return (bytes.len(), State::Opaque),
        }
    }
    (i, State::Chunked(chunk))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;
