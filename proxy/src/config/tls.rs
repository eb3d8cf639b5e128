//! The TLS settings of listeners and clusters as plain data: paths, names
//! and policies, validated but not loaded. `tls` turns them into rustls
//! configs (with their file watchers) when a snapshot is compiled.

use std::path::PathBuf;
use std::sync::Arc;

/// Lowest TLS version a listener accepts. TLS 1.0 and 1.1 are never offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// A certificate chain and its private key, as two PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate served when the client's SNI matches `sni`: a host name,
/// or `*.example.com` for any subdomain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniCert {
    pub sni: String,
    pub paths: CertPaths,
}

/// What a listener's `tls = { ... }` says, with paths resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsSettings {
    pub listener: Arc<str>,
    /// Served when no SNI entry matches (or the client sends no SNI).
    pub default: Option<CertPaths>,
    pub sni: Vec<SniCert>,
    /// When set, every client must present a certificate issued by it.
    pub client_ca: Option<PathBuf>,
    pub min_version: MinVersion,
}

impl ServerTlsSettings {
    /// Whether every client must present a certificate (mutual TLS).
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// What a cluster's `tls = { ... }` says, with paths resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTlsSettings {
    pub cluster: Arc<str>,
    /// CA bundle to verify upstreams against; `None`: the webpki roots.
    pub ca: Option<PathBuf>,
    /// Client certificate for mTLS.
    pub client: Option<CertPaths>,
    /// Server name sent and verified; `None`: the endpoint's address.
    pub sni: Option<String>,
    /// The URI or DNS SAN the upstream's certificate must carry.
    pub expect_identity: Option<String>,
    pub insecure_skip_verify: bool,
    /// Offer `h2` (cluster protocol http2) instead of `http/1.1`.
    pub h2: bool,
}

/// Which peer identities may call: exact entries, or prefixes written with
/// a trailing `*` (`spiffe://mesh.local/ns/default/*`). A peer without an
/// identity never matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    entries: Vec<Box<str>>,
}

impl Allow {
    pub fn new(entries: impl IntoIterator<Item = String>) -> Self {
        Self {
            entries: entries.into_iter().map(String::into_boxed_str).collect(),
        }
    }

    pub fn permits(&self, principal: Option<&str>) -> bool {
        let Some(p) = principal else { return false };
        self.entries.iter().any(|e| match e.strip_suffix('*') {
            Some(prefix) => p.starts_with(prefix),
            None => **e == *p,
        })
    }

    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| &**e)
    }
}
