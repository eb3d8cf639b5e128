//! Transport security: the TLS material of listeners (termination, client
//! certificate checks) and clusters (origination, mTLS), built on rustls with
//! the `ring` crypto provider.
//!
//! What lives here, and on which thread:
//! - Loading PEM files, building rustls `ServerConfig`s and `ClientConfig`s,
//!   and the identity rules (a peer's identity is its first URI SAN, e.g.
//!   `spiffe://mesh.local/ns/default/sa/reviews`, else its first DNS SAN).
//!   This runs when a snapshot is compiled (`snapshot::compile`), and on a
//!   watcher thread (`wasp-tls-watch`) when a certificate file changes.
//! - [`ServerTls`] and [`ClientTls`] each hold their current rustls config
//!   in an `ArcSwap`. Workers load it once per new connection (never per
//!   request); a rotation swaps it, so connections already open keep the
//!   config they started with and nothing is dropped. A certificate that
//!   fails to load (unreadable, unparsable, key not matching) changes
//!   nothing: the old one keeps serving and the log says why.
//! - Handshake failures are classified into a short, stable reason
//!   ([`reason`]) used as a metric label and in the log line.
//!
//! What never happens here: no handshake and no file IO on a worker's
//! request path; workers only `load()` an `Arc`.

mod client;
mod server;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;

pub use crate::config::tls::{
    Allow, CertPaths, ClientTlsSettings, MinVersion, ServerTlsSettings, SniCert,
};
pub use client::{ClientTls, UpstreamTlsError};
pub use server::{LocalCerts, ServerTls};

/// The one crypto provider of the process: rustls on `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

impl MinVersion {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            Self::Tls12 => &BOTH,
            Self::Tls13 => &ONLY13,
        }
    }
}

// === loading ===

/// Reads PEM files for one build of a TLS config, hashing every byte read so
/// a reload can tell whether anything changed. Each file is read once and
/// parsed from memory, so the hash and the parsed material always agree.
pub(crate) struct PemReader {
    hasher: sha2::Sha256,
}

impl PemReader {
    pub(crate) fn new() -> Self {
        use sha2::Digest;
        Self {
            hasher: sha2::Sha256::new(),
        }
    }

    fn read(&mut self, path: &Path) -> Result<Vec<u8>, String> {
        use sha2::Digest;
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.hasher.update(path.as_os_str().as_encoded_bytes());
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(&bytes);
        Ok(bytes)
    }

    /// Every certificate of a PEM file, in order (leaf first for a chain).
    pub(crate) fn certs(&mut self, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        let bytes = self.read(path)?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
        if certs.is_empty() {
            return Err(format!("{}: no CERTIFICATE block found", path.display()));
        }
        Ok(certs)
    }

    /// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
    pub(crate) fn key(&mut self, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
        let bytes = self.read(path)?;
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            format!(
                "{}: no usable private key: {}",
                path.display(),
                pem_error(e)
            )
        })
    }

    /// A trust store from a PEM bundle of CA certificates.
    pub(crate) fn roots(&mut self, path: &Path) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
        Ok(roots)
    }

    /// A chain and its key, checked to belong together.
    pub(crate) fn certified_key(
        &mut self,
        paths: &CertPaths,
    ) -> Result<(rustls::sign::CertifiedKey, CertFacts), String> {
        let certs = self.certs(&paths.cert)?;
        let key = self.key(&paths.key)?;
        let facts =
            CertFacts::parse(&certs[0]).map_err(|e| format!("{}: {e}", paths.cert.display()))?;
        let ck = rustls::sign::CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
            format!(
                "{} with key {}: {e}",
                paths.cert.display(),
                paths.key.display()
            )
        })?;
        Ok((ck, facts))
    }

    /// The fingerprint a build reading `paths` in this order would have,
    /// without parsing anything: how a reload tells that nothing changed.
    pub(crate) fn fingerprint_of(paths: &[PathBuf]) -> Result<[u8; 32], String> {
        let mut reader = Self::new();
        for p in paths {
            reader.read(p)?;
        }
        Ok(reader.finish())
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.hasher.finalize().into()
    }
}

fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM block of the expected kind".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// The facts about a certificate the proxy uses: identity and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// URI SANs, in order.
    pub uris: Vec<String>,
    /// DNS SANs, in order.
    pub dns: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertFacts {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse the certificate: {e}"))?;
        Ok(Self::of(&cert))
    }

    /// The facts of a parsed certificate.
    fn of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Self {
        let mut facts = Self {
            uris: Vec::new(),
            dns: Vec::new(),
            not_after: cert.validity().not_after.timestamp(),
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => facts.uris.push(u.to_string()),
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        facts.dns.push(d.to_string())
                    }
                    _ => {}
                }
            }
        }
        facts
    }

    /// The identity: the first URI SAN, else the first DNS SAN.
    pub fn identity(&self) -> Option<&str> {
        self.uris.first().or(self.dns.first()).map(String::as_str)
    }

    /// True if any URI or DNS SAN is exactly `identity`.
    pub fn has_identity(&self, identity: &str) -> bool {
        self.uris.iter().chain(&self.dns).any(|n| n == identity)
    }
}

/// What filters may read about a downstream TLS connection (Envoy's
/// `connection.*` TLS attributes), worked out once when the handshake is
/// done and shared by every request of the connection, so no callback
/// parses a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnTls {
    /// `TLSv1.2` / `TLSv1.3`, as OpenSSL (and Envoy) name them.
    pub version: &'static str,
    /// The SNI the client asked for.
    pub sni: Option<Box<str>>,
    /// The client certificate's facts, when it presented one that parses.
    pub peer: Option<CertInfo>,
    /// The client presented a certificate (parsed or not): `connection.mtls`.
    pub mtls: bool,
    /// The client's identity (its first URI SAN, else its first DNS SAN):
    /// `source.principal` and route `allow` lists.
    pub principal: Option<Arc<str>>,
    /// The facts of the certificate this listener served.
    pub local: Option<Arc<CertInfo>>,
}

/// What filters may read about the upstream connection a response came
/// on (Envoy's `upstream.*` attributes), kept once per connection and
/// shared by every request sent on it.
#[derive(Debug, Default)]
pub struct UpstreamConn {
    /// This side's address of the connection (`upstream.local_address`).
    pub local_address: Option<std::net::SocketAddr>,
    /// `None` over plain text.
    pub tls: Option<UpstreamTls>,
}

/// An upstream TLS connection's facts. The upstream's certificate is
/// kept as DER and only worked out (parse, RFC 2253 subject, digest) when
/// a filter first reads one of its attributes: most connections never are
/// asked, and the certificate is the upstream's to make large.
#[derive(Debug, Default)]
pub struct UpstreamTls {
    /// `TLSv1.2` / `TLSv1.3`.
    pub version: &'static str,
    /// The upstream's leaf certificate, as it sent it.
    peer_der: Option<Arc<[u8]>>,
    peer: std::sync::OnceLock<Option<CertInfo>>,
    peer_sha256: std::sync::OnceLock<Box<str>>,
    /// The client certificate wasp presented (parsed once per load).
    pub local: Option<Arc<CertInfo>>,
}

/// Upstream leaf certificates longer than this are not parsed for
/// `upstream.*_peer_certificate` (their digest is still given): a real
/// one is 1-2 KiB, and the subject string can be about three times the
/// DER.
pub const MAX_PARSED_PEER_CERT: usize = 16 * 1024;

impl UpstreamTls {
    /// The facts of an upstream connection wasp opened; `local` is the
    /// client certificate it presented (from the same config).
    pub fn of(conn: &rustls::ClientConnection, local: Option<Arc<CertInfo>>) -> Self {
        let leaf = conn.peer_certificates().and_then(|chain| chain.first());
        Self::with_peer(
            version_name(conn.protocol_version()),
            leaf.map(|l| l.as_ref()),
            local,
        )
    }

    /// The facts from their parts (nothing of the certificate worked out
    /// yet).
    fn with_peer(version: &'static str, der: Option<&[u8]>, local: Option<Arc<CertInfo>>) -> Self {
        Self {
            version,
            peer_der: der.map(Arc::from),
            peer: std::sync::OnceLock::new(),
            peer_sha256: std::sync::OnceLock::new(),
            local,
        }
    }

    /// The upstream certificate's facts, worked out on first read; `None`
    /// without a certificate, or for one that does not parse (possible
    /// only with `insecure_skip_verify`) or is over
    /// [`MAX_PARSED_PEER_CERT`].
    pub fn peer(&self) -> Option<&CertInfo> {
        let der = self.peer_der.as_deref()?;
        self.peer
            .get_or_init(|| {
                if der.len() > MAX_PARSED_PEER_CERT {
                    return None;
                }
                CertInfo::parse(der)
            })
            .as_ref()
    }

    /// SHA-256 of the upstream certificate's DER, lower-case hex, whether
    /// or not it parses (as Envoy hashes the raw certificate).
    pub fn peer_sha256(&self) -> Option<&str> {
        let der = self.peer_der.as_deref()?;
        Some(self.peer_sha256.get_or_init(|| sha256_hex(der).into()))
    }
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// Facts of a leaf certificate, in Envoy's encodings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject in RFC 2253 form (`CN=client,O=Example`).
    pub subject: Box<str>,
    pub uri_san: Option<Box<str>>,
    pub dns_san: Option<Box<str>>,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256: Box<str>,
}

impl ConnTls {
    /// The facts of an accepted server connection; `local` are the
    /// listener's certificates (the one served is picked by SNI).
    pub fn of(conn: &rustls::ServerConnection, local: &LocalCerts) -> Self {
        let version = version_name(conn.protocol_version());
        let sni = conn.server_name();
        let leaf = conn.peer_certificates().and_then(|chain| chain.first());
        // One parse of the client certificate gives the identity and the
        // facts filters read.
        let (peer, principal) = match leaf.and_then(|l| CertInfo::parse_with_identity(l)) {
            Some((info, principal)) => (Some(info), principal),
            None => (None, None),
        };
        Self {
            version,
            sni: sni.map(Box::from),
            peer,
            mtls: leaf.is_some(),
            principal,
            local: local.pick(sni),
        }
    }
}

/// `TLSv1.2` / `TLSv1.3`, as OpenSSL (and Envoy) name them.
fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}

impl CertInfo {
    /// `None` for a certificate that does not parse (the handshake
    /// accepted it, so that only happens with `client_ca` unset).
    pub fn parse(der: &[u8]) -> Option<Self> {
        Self::parse_with_identity(der).map(|(info, _)| info)
    }

    /// The facts and the identity ([`CertFacts::identity`]) from one parse.
    pub fn parse_with_identity(der: &[u8]) -> Option<(Self, Option<Arc<str>>)> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let facts = CertFacts::of(&cert);
        let identity = facts.identity().map(Arc::from);
        let sha256 = sha256_hex(der);
        let info = Self {
            subject: rfc2253(cert.subject()).into(),
            uri_san: facts.uris.into_iter().next().map(Box::from),
            dns_san: facts.dns.into_iter().next().map(Box::from),
            sha256: sha256.into(),
        };
        Some((info, identity))
    }
}

/// A distinguished name as OpenSSL prints it with `XN_FLAG_RFC2253` (what
/// Envoy reports): last RDN first, `,` between RDNs, `+` inside one, short
/// names for the common attributes, `#hex` for values that are not text.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<_> = name.iter().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            let short = match oid.as_str() {
                "2.5.4.3" => "CN",
                "2.5.4.6" => "C",
                "2.5.4.7" => "L",
                "2.5.4.8" => "ST",
                "2.5.4.9" => "street",
                "2.5.4.10" => "O",
                "2.5.4.11" => "OU",
                "2.5.4.5" => "serialNumber",
                "0.9.2342.19200300.100.1.25" => "DC",
                "0.9.2342.19200300.100.1.1" => "UID",
                "1.2.840.113549.1.9.1" => "emailAddress",
                "2.5.4.4" => "SN",
                "2.5.4.42" => "GN",
                "2.5.4.43" => "initials",
                "2.5.4.44" => "generationQualifier",
                "2.5.4.12" => "title",
                "2.5.4.15" => "businessCategory",
                "2.5.4.17" => "postalCode",
                "2.5.4.46" => "dnQualifier",
                "2.5.4.65" => "pseudonym",
                _ => "",
            };
            // OpenSSL's DUMP_UNKNOWN_FIELDS: an attribute it has no name
            // for is the dotted OID and `#` + the hex of the value's DER.
            let known = !short.is_empty();
            out.push_str(if known { short } else { oid.as_str() });
            out.push('=');
            match atv.as_str() {
                Ok(v) if known => escape_rfc2253(v, &mut out),
                _ => dump_der(atv.attr_value(), &mut out),
            }
        }
    }
    out
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_hex(b: u8, out: &mut String) {
    out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
    out.push(char::from(HEX_UPPER[usize::from(b & 15)]));
}

/// `#` and the hex of a value's whole DER (tag, length, contents), as
/// OpenSSL's `ASN1_STRFLGS_DUMP_DER`.
fn dump_der(v: &x509_parser::der_parser::asn1_rs::Any<'_>, out: &mut String) {
    out.push('#');
    let tag = v.header.tag().0;
    let data = v.data;
    // Low tag numbers only (every string and time type); a high tag
    // number is dumped without its header rather than mis-encoded.
    if let Ok(t @ 0..=30) = u8::try_from(tag) {
        let class = (v.header.class() as u8) << 6;
        let constructed = if v.header.is_constructed() { 0x20 } else { 0 };
        push_hex(class | constructed | t, out);
        let len = data.len();
        if len < 0x80 {
            push_hex(len as u8, out);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            let body = bytes.get(skip..).unwrap_or_default();
            push_hex(0x80 | body.len() as u8, out);
            for b in body {
                push_hex(*b, out);
            }
        }
    }
    for b in data {
        push_hex(*b, out);
    }
}

/// OpenSSL's `ASN1_STRFLGS_RFC2253` on a text value: RFC 2253's special
/// characters escaped with `\`, control characters and every byte of a
/// non-ASCII character (as UTF-8) as `\XX`.
fn escape_rfc2253(v: &str, out: &mut String) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        if c.is_ascii_control() || !c.is_ascii() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('\\');
                push_hex(b, out);
            }
            continue;
        }
        let edge_space = c == ' ' && (i == 0 || i == last);
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || edge_space
            || (i == 0 && c == '#')
        {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A short, stable name for why a handshake failed: a metric label.
pub fn reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::UnknownIssuer => "untrusted",
            C::BadSignature => "bad_signature",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong_name",
            C::Revoked => "revoked",
            C::Other(_) => "wrong_identity",
            _ => "bad_certificate",
        },
        E::AlertReceived(_) => "peer_alert",
        E::PeerIncompatible(_) => "incompatible",
        E::NoApplicationProtocol => "no_alpn",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => "not_tls",
        E::General(_) => "no_certificate",
        _ => "protocol",
    }
}

/// A rustls error anywhere in `err`'s cause chain, including inside an
/// `io::Error` (whose `source()` skips its own payload).
pub fn rustls_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(tls);
            }
        }
        cur = e.source();
    }
    None
}

/// The rustls error inside an IO error from tokio-rustls, as text.
pub fn describe(err: &std::io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        // rustls prints `Other` with Debug; ours (identity mismatch) reads
        // better with Display.
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        Some(tls) => tls.to_string(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests;
