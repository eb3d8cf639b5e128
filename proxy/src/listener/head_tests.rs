//! The head checks: hand-picked shapes, and a bounded randomized run that
//! compares them with httparse (hyper's parser) on every head it parses.
//!
//! `WASP_FUZZ_CASES=1000000 cargo test -p wasp --lib guard_fuzz` runs a
//! longer campaign; `WASP_FUZZ_SEED=n` picks another seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const MAX: usize = 8192;

fn head(bytes: &[u8]) -> Verdict {
    check_head(bytes, MAX)
}

#[test]
fn crlf_bare_lf_and_mixed_heads_end_where_httparse_says() {
    for (bytes, len) in [
        (&b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"[..], 27),
        (b"GET / HTTP/1.1\nHost: a\n\nrest", 24),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\nrest", 26),
        (b"\r\n\nGET / HTTP/1.1\nHost: a\r\n\nrest", 28),
    ] {
        assert_eq!(
            head(bytes),
            Verdict::Head {
                len,
                body: BodyLen::Length(0)
            },
            "{}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(
            oracle(bytes, MAX),
            Oracle::Complete {
                len,
                framing: Ok(BodyLen::Length(0))
            }
        );
    }
    assert_eq!(head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Verdict::Incomplete);
}

#[test]
fn smuggling_shapes_are_refused_in_any_line_ending() {
    for bytes in [
        &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 4\n\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\nContent-Length: 4\r\n\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: x\r\n\r\n",
    ] {
        assert!(
            matches!(head(bytes), Verdict::Refuse(Refusal::Framing(_))),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(
        head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n"),
        Verdict::Refuse(Refusal::Framing("conflicting Content-Length values"))
    );
    assert_eq!(
        head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"),
        Verdict::Head {
            len: 41,
            body: BodyLen::Length(5)
        }
    );
}

#[test]
fn heads_over_the_limit_are_refused_complete_or_not() {
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX));
    assert_eq!(head(long.as_bytes()), Verdict::Refuse(Refusal::TooLarge));
    let done = format!("{long}\r\n");
    assert_eq!(head(done.as_bytes()), Verdict::Refuse(Refusal::TooLarge));
}

#[test]
fn the_scanner_follows_bodies_to_the_next_head() {
    let bad = &b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"[..];
    // (The empty line after the last body starts no head: the refused
    // head begins at it, and hyper skips it too.)
    for (first, skipped) in [
        (&b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..], 0),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 0),
        (b"POST /a HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n", 0),
        (b"POST /a HTTP/1.1\nContent-Length: 2\n\nab\r\n", 2),
    ] {
        let stream = [first, bad].concat();
        // Whole, and a byte at a time: the refusal names the bad head.
        let mut s = Scanner::new(MAX);
        assert_eq!(
            s.feed(&stream).map(|(at, r)| (at, matches!(r, Refusal::Framing(_)))),
            Some((first.len() - skipped, true)),
            "{}",
            String::from_utf8_lossy(&stream)
        );
        let mut s = Scanner::new(MAX);
        let refused = stream
            .iter()
            .enumerate()
            .find_map(|(i, b)| s.feed(std::slice::from_ref(b)).map(|r| (i, r)));
        assert_eq!(refused.map(|(i, _)| i), Some(stream.len() - 6));
    }
    // A body that only looks like a bad head is a body.
    let body_like = [
        format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", bad.len()).as_bytes(),
        bad,
    ]
    .concat();
    let mut s = Scanner::new(MAX);
    assert_eq!(s.feed(&body_like), None);
    assert_eq!(s.state(), State::Head);
    // An upgrade or CONNECT the proxy did not accept leaves an HTTP
    // connection: the next head is checked.
    for first in [
        &b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    ] {
        let mut s = Scanner::new(MAX);
        assert_eq!(
            s.feed(&[first, bad].concat()).map(|(at, _)| at),
            Some(first.len())
        );
    }
    // After a head hyper refuses, nothing is followed.
    let mut s = Scanner::new(MAX);
    let refused = b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
    assert_eq!(s.feed(&[&refused[..], bad].concat()), None);
    assert_eq!(s.state(), State::Opaque);
}

// ---- randomized comparison with httparse ---------------------------------

/// What hyper makes of a head, from httparse's parse and hyper's framing
/// rules (`proto/h1/role.rs`).
#[derive(Debug, PartialEq, Eq)]
enum Oracle {
    Partial,
    Error,
    Complete {
        len: usize,
        /// `Err` when hyper refuses the framing, or when it is a shape the
        /// guard refuses (both CL and TE).
        framing: Result<BodyLen, &'static str>,
    },
}

fn oracle(bytes: &[u8], max: usize) -> Oracle {
    let _ = max;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Oracle::Partial,
        Err(_) => return Oracle::Error,
    };
    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None;
    let mut framing = Ok(());
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            for item in h.value.split(|b| *b == b',') {
                let v = std::str::from_utf8(item).ok().map(str::trim);
                match v
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(n) if length.is_some_and(|l| l != n) => framing = Err("conflicting"),
                    Some(n) => length = Some(n),
                    None => framing = Err("invalid length"),
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            let last = std::str::from_utf8(last)
                .unwrap_or("")
                .trim_matches([' ', '\t']);
            te = Some(last.eq_ignore_ascii_case("chunked"));
        }
    }
    let has_cl = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("content-length"));
    let framing = match (framing, te) {
        (_, Some(_)) if has_cl => Err("both"),
        (Err(e), _) => Err(e),
        (Ok(()), Some(false)) => Err("te not chunked"),
        (Ok(()), Some(true)) => Ok(BodyLen::Chunked),
        (Ok(()), None) => Ok(BodyLen::Length(length.unwrap_or(0))),
    };
    Oracle::Complete { len, framing }
}

/// The guard and hyper agree on every head hyper parses; where hyper
/// refuses or wants more, the guard may do anything but panic.
fn agrees(bytes: &[u8], max: usize) -> Result<(), String> {
    let ours = check_head(bytes, max);
    let theirs = oracle(bytes, max);
    let skip = leading_empty_lines(bytes);
    let ok = match (&ours, &theirs) {
        (_, Oracle::Error) => true,
        (Verdict::Incomplete, Oracle::Partial) => true,
        (Verdict::Refuse(Refusal::TooLarge), Oracle::Partial) => bytes.len() - skip > max,
        (Verdict::Refuse(Refusal::TooLarge), Oracle::Complete { len, .. }) => len - skip > max,
        // Refusing what hyper refuses anyway is a 400 either way.
        (Verdict::Refuse(Refusal::Framing(_)), Oracle::Complete { framing, .. }) => {
            framing.is_err()
        }
        (Verdict::Head { len, body }, Oracle::Complete { len: l, framing }) => {
            len == l
                && match framing {
                    Ok(b) => b == body,
                    // hyper refuses it: the guard stops following.
                    Err("invalid length" | "te not chunked") => *body == BodyLen::Opaque,
                    Err(_) => false,
                }
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "guard {ours:?} vs hyper {theirs:?} on {:?}",
            String::from_utf8_lossy(bytes)
        ))
    }
}

fn cases() -> usize {
    std::env::var("WASP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn rng() -> StdRng {
    let seed = std::env::var("WASP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0016);
    StdRng::seed_from_u64(seed)
}

const ALPHABET: &[u8] = b"GETPOSch :\r\n\r\n\t,;0159aAzZ-/\x00\x7f\xff";

fn arbitrary(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.gen_range(0..160);
    (0..n)
        .map(|_| {
            if rng.gen_bool(0.7) {
                ALPHABET[rng.gen_range(0..ALPHABET.len())]
            } else {
                rng.gen()
            }
        })
        .collect()
}

fn valid_ish(rng: &mut StdRng) -> Vec<u8> {
    const METHODS: &[&str] = &["GET", "POST", "PUT", "CONNECT", "DELETE"];
    const HEADERS: &[&str] = &[
        "Host: a",
        "Content-Length: 5",
        "Content-Length: 0",
        "Content-Length: 5, 5",
        "Content-Length: 5,6",
        "Content-Length: 99999999999999999999",
        "Content-Length: 00000000000000000000000000007",
        "Content-Length: -1",
        "Content-Length: +5",
        "content-length:7",
        "Content-Length : 5",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked, gzip",
        "transfer-encoding: Chunked",
        "Transfer-Encoding: gzip",
        "Upgrade: websocket",
        "Connection: upgrade",
        " folded",
        "\tfolded",
        "X-Empty:",
        "No-Colon",
        "X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ];
    let eol = |rng: &mut StdRng| if rng.gen_bool(0.5) { "\r\n" } else { "\n" };
    let mut out = String::new();
    for _ in 0..rng.gen_range(0..3) {
        out.push_str(eol(rng));
    }
    out.push_str(METHODS[rng.gen_range(0..METHODS.len())]);
    out.push_str(" /x HTTP/1.");
    out.push(if rng.gen_bool(0.8) { '1' } else { '0' });
    out.push_str(eol(rng));
    for _ in 0..rng.gen_range(0..6) {
        out.push_str(HEADERS[rng.gen_range(0..HEADERS.len())]);
        out.push_str(eol(rng));
    }
    if rng.gen_bool(0.9) {
        out.push_str(eol(rng));
    }
    let mut bytes = out.into_bytes();
    // Mutations: flip, insert or delete a few bytes.
    for _ in 0..rng.gen_range(0..3) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.gen_range(0..bytes.len());
        match rng.gen_range(0..3) {
            0 => bytes[at] = ALPHABET[rng.gen_range(0..ALPHABET.len())],
            1 => bytes.insert(at, ALPHABET[rng.gen_range(0..ALPHABET.len())]),
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

/// Feeding a stream whole or cut into random reads gives the same
/// refusal at the same place.
fn split_consistent(rng: &mut StdRng, stream: &[u8], max: usize) -> Result<(), String> {
    let mut whole = Scanner::new(max);
    let expected = whole.feed(stream);
    let mut parts = Scanner::new(max);
    let mut offset = 0;
    let mut got = None;
    while offset < stream.len() {
        let n = rng.gen_range(1..=stream.len() - offset);
        if let Some((at, r)) = parts.feed(&stream[offset..offset + n]) {
            got = Some((at + offset, r));
            break;
        }
        offset += n;
    }
    // A refused head found across reads is reported from the read where
    // it began (or 0 in a later read): compare the refusal, not the place.
    let same = match (expected, got) {
        (None, None) => whole.state() == parts.state(),
        (Some((_, a)), Some((_, b))) => a == b,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "whole {expected:?} vs split {got:?} on {:?}",
            String::from_utf8_lossy(stream)
        ))
    }
}

#[test]
fn guard_fuzz_heads_agree_with_httparse() {
    let mut rng = rng();
    let mut failures = Vec::new();
    let mut complete = 0;
    for i in 0..cases() {
        let bytes = if i % 2 == 0 {
            arbitrary(&mut rng)
        } else {
            valid_ish(&mut rng)
        };
        let max = if rng.gen_bool(0.1) {
            rng.gen_range(0..64)
        } else {
            MAX
        };
        if matches!(oracle(&bytes, max), Oracle::Complete { .. }) {
            complete += 1;
        }
        if let Err(e) = agrees(&bytes, max) {
            failures.push(e);
        }
    }
    assert!(
        complete > cases() / 10,
        "only {complete} heads parsed: the generator is off"
    );
    assert!(
        failures.is_empty(),
        "{} disagreements, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}

#[test]
fn guard_fuzz_scanner_is_split_consistent() {
    let mut rng = rng();
    let mut failures = Vec::new();
    for _ in 0..cases() / 2 {
        let mut stream = Vec::new();
        for _ in 0..rng.gen_range(1..4) {
            stream.extend(valid_ish(&mut rng));
            match rng.gen_range(0..4) {
                0 => stream.extend_from_slice(b"hello"),
                1 => stream.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n"),
                2 => stream.extend(arbitrary(&mut rng)),
                _ => {}
            }
        }
        let max = if rng.gen_bool(0.2) {
            rng.gen_range(0..64)
        } else {
            MAX
        };
        if let Err(e) = split_consistent(&mut rng, &stream, max) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}
