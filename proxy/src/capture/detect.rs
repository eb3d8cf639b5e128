//! Protocol detection on a captured connection, from the first bytes the
//! client sent (peeked, never consumed: the winner gets them replayed).
//!
//! [`detect`] is a pure function of those bytes: HTTP/1.x (a request line's
//! method token and a space), HTTP/2 (the connection preface), TLS (a
//! ClientHello record, with its SNI and ALPN so TLS the app originates can
//! be routed without terminating it), or opaque TCP. While the bytes could
//! still become one of the first three it answers [`Detection::NeedMore`];
//! the caller decides how long to wait (server-speaks-first protocols never
//! send anything, so a short timeout then means opaque).
//!
//! Every length read from the wire is bounds-checked: a hostile peer gets
//! `Opaque`, never a panic.

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// Not enough bytes to tell yet: they are a prefix of an HTTP/1
    /// request line (after optional empty lines), the h2 preface or a TLS
    /// ClientHello. A caller that stops waiting must treat this as HTTP,
    /// never as opaque, or a client could slip HTTP past the HTTP filters
    /// by sending slowly.
    NeedMore,
    Http1,
    Http2,
    Tls(ClientHello),
    Opaque,
}

/// What routing needs from a TLS ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), if the client sent one.
    pub sni: Option<String>,
    /// ALPN protocol names, in the client's order.
    pub alpn: Vec<String>,
}

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token considered (longer: not HTTP/1).
const MAX_METHOD: usize = 24;

/// Largest ClientHello waited for; one larger is treated as opaque TLS
/// without a name (real ones are a few hundred bytes; post-quantum key
/// shares make them ~1.8 KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

pub fn detect(bytes: &[u8]) -> Detection {
    if bytes.is_empty() {
        return Detection::NeedMore;
    }
    if let Some(first) = bytes.first() {
        if *first == 0x16 {
            return tls(bytes);
        }
    }
    // HTTP/1 servers skip empty lines before a request line (RFC 9112
    // 2.2), so CR/LF there must not make a request look opaque.
    let skip = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(bytes.len());
    let bytes = bytes.get(skip..).unwrap_or_default();
    if bytes.is_empty() {
        return Detection::NeedMore;
    }
    // The h2 preface starts like an HTTP/1 request line ("PRI * HTTP/2.0"),
    // so it is decided first.
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes.get(..n) == H2_PREFACE.get(..n) {
        return if n == H2_PREFACE.len() {
            Detection::Http2
        } else {
            Detection::NeedMore
        };
    }
    http1(bytes)
}

/// Request methods recognised as HTTP/1 (RFC 9110, PATCH, WebDAV): any
/// other word is opaque, so a text protocol whose commands look alike
/// (Redis inline `SET k v`, SMTP `HELO x`) is not taken for HTTP.
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
    b"MKCALENDAR",
    b"ACL",
];

/// A known method followed by a space.
fn http1(bytes: &[u8]) -> Detection {
    let word_end = bytes.iter().position(|b| *b == b' ');
    let word = match word_end {
        Some(end) => bytes.get(..end).unwrap_or_default(),
        None => bytes.get(..bytes.len().min(MAX_METHOD)).unwrap_or_default(),
    };
    if word_end.is_some() {
        return if METHODS.contains(&word) {
            Detection::Http1
        } else {
            Detection::Opaque
        };
    }
    // No space yet: still a prefix of some method?
    if bytes.len() <= MAX_METHOD && METHODS.iter().any(|m| m.starts_with(word)) {
        Detection::NeedMore
    } else {
        Detection::Opaque
    }
}

/// A big-endian reader that answers `None` past the end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(*first)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
    }

    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(
            usize::from(*b.first()?) << 16 | usize::from(*b.get(1)?) << 8 | usize::from(*b.get(2)?),
        )
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<Reader<'a>> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => self.u24()?,
        };
        Some(Reader {
            bytes: self.take(len)?,
        })
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A TLS record carrying a handshake: gather the ClientHello (it may span
/// records) and read SNI and ALPN from it.
fn tls(bytes: &[u8]) -> Detection {
    // Records: type(1) version(2) length(2) fragment.
    let mut handshake = Vec::new();
    let mut rest = Reader { bytes };
    loop {
        if rest.is_empty() {
            break;
        }
        let Some(content_type) = rest.u8() else {
            return Detection::NeedMore;
        };
        if content_type != 0x16 {
            return Detection::Opaque;
        }
        let Some(major) = rest.u8() else {
            return Detection::NeedMore;
        };
        if major != 3 {
            return Detection::Opaque;
        }
        if rest.u8().is_none() {
            return Detection::NeedMore;
        }
        let Some(len) = rest.u16() else {
            return Detection::NeedMore;
        };
        if len == 0 || usize::from(len) > 16 * 1024 + 256 {
            return Detection::Opaque;
        }
        match rest.take(usize::from(len)) {
            Some(fragment) => handshake.extend_from_slice(fragment),
            None => {
                // Part of this record has arrived; keep what is there.
                handshake.extend_from_slice(rest.bytes);
                rest.bytes = &[];
            }
        }
        if handshake.len() >= 4 {
            break;
        }
    }
    // Handshake: msg_type(1) length(3) body.
    let mut h = Reader { bytes: &handshake };
    match h.u8() {
        None => return Detection::NeedMore,
        Some(1) => {}
        Some(_) => return Detection::Opaque,
    }
    let Some(len) = h.u24() else {
        return Detection::NeedMore;
    };
    if len > MAX_CLIENT_HELLO {
        return Detection::Tls(ClientHello::default());
    }
    if h.bytes.len() < len {
        // Wait for the rest, which may come in more records.
        return more_records(bytes, len);
    }
    match h
        .take(len)
        .and_then(|body| client_hello(Reader { bytes: body }))
    {
        Some(hello) => Detection::Tls(hello),
        None => Detection::Opaque,
    }
}

/// The ClientHello is longer than what arrived: if the records seen so far
/// are all complete, more records are needed; gather them.
fn more_records(bytes: &[u8], hello_len: usize) -> Detection {
    let mut r = Reader { bytes };
    let mut body = Vec::new();
    while !r.is_empty() {
        let header = r.take(5);
        let Some(header) = header else {
            return Detection::NeedMore;
        };
        // Every record of a ClientHello is a handshake record.
        if header.first() != Some(&0x16) {
            return Detection::Opaque;
        }
        let len = usize::from(u16::from_be_bytes([
            *header.get(3).unwrap_or(&0),
            *header.get(4).unwrap_or(&0),
        ]));
        match r.take(len) {
            Some(f) => body.extend_from_slice(f),
            None => return Detection::NeedMore,
        }
    }
    if body.len() >= hello_len.saturating_add(4) {
        let mut h = Reader { bytes: &body };
        let parsed = h
            .take(4)
            .and_then(|_| h.take(hello_len))
            .and_then(|b| client_hello(Reader { bytes: b }));
        return parsed.map_or(Detection::Opaque, Detection::Tls);
    }
    Detection::NeedMore
}

/// ClientHello body (RFC 8446 4.1.2): version, random, session id, cipher
/// suites, compression methods, extensions.
fn client_hello(mut r: Reader<'_>) -> Option<ClientHello> {
    r.take(2 + 32)?;
    r.vec(1)?;
    r.vec(2)?;
    r.vec(1)?;
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Some(hello);
    }
    let mut exts = r.vec(2)?;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let mut data = exts.vec(2)?;
        match kind {
            0 => {
                // server_name: list of (type, name); type 0 is host_name.
                let mut list = data.vec(2)?;
                while !list.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec(2)?;
                    if name_type == 0 && hello.sni.is_none() {
                        let text = std::str::from_utf8(name.bytes).ok()?;
                        hello.sni = Some(text.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = data.vec(2)?;
                while !list.is_empty() {
                    let proto = list.vec(1)?;
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(proto.bytes).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A ClientHello as a TLS 1.3 client sends it, with SNI and ALPN.
    pub(crate) fn client_hello_bytes(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut exts = Vec::new();
        let name = sni.as_bytes();
        let mut sn = Vec::new();
        sn.push(0u8);
        sn.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sn.extend_from_slice(name);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&((sn.len() + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sn);
        let mut protos = Vec::new();
        for p in alpn {
            protos.push(p.len() as u8);
            protos.extend_from_slice(p.as_bytes());
        }
        exts.extend_from_slice(&16u16.to_be_bytes());
        exts.extend_from_slice(&((protos.len() + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(protos.len() as u16).to_be_bytes());
        exts.extend_from_slice(&protos);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tells_the_protocols_apart() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(detect(b"PROPFIND /dav HTTP/1.1"), Detection::Http1);
        assert_eq!(detect(b"SET k v\r\n"), Detection::Opaque, "redis inline");
        assert_eq!(detect(b"HELO mail.example\r\n"), Detection::Opaque, "smtp");
        assert_eq!(detect(b"XYZ"), Detection::Opaque);
        assert_eq!(detect(b"GE"), Detection::NeedMore);
        assert_eq!(
            detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Detection::Http2
        );
        assert_eq!(detect(b"PRI * HTTP/2"), Detection::NeedMore);
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Detection::Opaque, "redis");
        assert_eq!(
            detect(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Detection::Opaque,
            "postgres SSLRequest"
        );
        assert_eq!(detect(b"get / HTTP/1.1"), Detection::Opaque);
        assert_eq!(detect(b""), Detection::NeedMore);
    }

    #[test]
    fn empty_lines_before_a_request_line_are_skipped() {
        assert_eq!(detect(b"\r\nGET /admin HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(detect(b"\r\n\n\r\nPOST / HTTP/1.1"), Detection::Http1);
        assert_eq!(detect(b"\r\n"), Detection::NeedMore);
        assert_eq!(detect(b"\r\nGE"), Detection::NeedMore);
        assert_eq!(detect(b"\r\nSET k v\r\n"), Detection::Opaque);
    }

    #[test]
    fn reads_sni_and_alpn_whole_or_in_pieces() {
        let hello = client_hello_bytes("DB.Example.com", &["h2", "http/1.1"]);
        let want = Detection::Tls(ClientHello {
            sni: Some("db.example.com".into()),
            alpn: vec!["h2".into(), "http/1.1".into()],
        });
        assert_eq!(detect(&hello), want);
        for cut in 1..hello.len() {
            assert_eq!(detect(&hello[..cut]), Detection::NeedMore, "cut at {cut}");
        }
        // The same handshake split over two records.
        let hs = &hello[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(detect(&two), want);
    }

    /// A real client's ClientHello (rustls, with its key shares and
    /// extensions), not only the hand-built one.
    #[test]
    fn reads_a_real_client_hello() {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            Err(e) => panic!("rustls config: {e}"),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = rustls_pki_types::ServerName::try_from("reviews.default.svc")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut wire = Vec::new();
        while conn.wants_write() {
            if conn.write_tls(&mut wire).is_err() {
                break;
            }
        }
        assert_eq!(
            detect(&wire),
            Detection::Tls(ClientHello {
                sni: Some("reviews.default.svc".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
            })
        );
    }

    /// Arbitrary and mutated inputs never panic (a bounded run; longer:
    /// `WASP_FUZZ_CASES=1000000 cargo test -p wasp --lib capture::detect`).
    #[test]
    fn hostile_bytes_never_panic() {
        let cases: u64 = std::env::var("WASP_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut rng = StdRng::seed_from_u64(0xdec0de);
        let seed = client_hello_bytes("a.example", &["h2"]);
        for _ in 0..cases {
            let mut bytes = if rng.gen_bool(0.5) {
                seed.clone()
            } else {
                (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
            };
            for _ in 0..rng.gen_range(0..4) {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[i] = rng.gen(),
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, rng.gen()),
                }
            }
            let _ = detect(&bytes);
        }
    }
}
