//! TLS termination for one listener: the certificates it serves (a default
//! one and any number chosen by SNI), the client CA it may require, and the
//! reload of all of that when the files change.
//!
//! Built when a snapshot is compiled (so a bad file is a config error with
//! the position of the listener's `tls`), reloaded on the `wasp-tls-watch` thread,
//! read by workers once per accepted connection.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::watch::{self, Watch};
use super::{provider, PemReader, ServerTlsSettings};
use crate::telemetry::{Metrics, TlsErrors};

/// A listener's TLS state: the current rustls config and its watcher.
pub struct ServerTls {
    settings: ServerTlsSettings,
    current: ArcSwap<Loaded>,
    started: OnceLock<Started>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// The same with no ALPN: for bytes that are not HTTP (L4 TLS), where
    /// offering or requiring HTTP's protocol names would refuse a peer
    /// that names its own (Postgres direct SSL sends `postgresql`).
    opaque: Arc<ServerConfig>,
    /// The served certificates' facts, picked like the resolver picks.
    local: Arc<LocalCerts>,
    fingerprint: [u8; 32],
    /// notAfter of each served certificate: default first, then SNI order.
    expiry: Vec<i64>,
}

struct Started {
    _watch: Watch,
    /// Parallel to `Loaded::expiry`.
    gauges: Vec<Gauge>,
    errors: TlsErrors,
}

/// Facts of the served certificates, for the `connection.*_local_certificate`
/// attributes: chosen by SNI exactly as [`Resolver`] chooses the key.
#[derive(Debug, Default)]
pub struct LocalCerts {
    default: Option<Arc<super::CertInfo>>,
    /// One entry per SNI certificate, in the resolver's order: `None` for a
    /// certificate whose facts do not parse, so its connections get no
    /// facts rather than another certificate's.
    by_name: Vec<(String, Option<Arc<super::CertInfo>>)>,
}

impl LocalCerts {
    /// The facts of the certificate served for `sni`.
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<super::CertInfo>> {
        if let Some(name) = sni {
            for (pattern, info) in &self.by_name {
                if sni_matches(pattern, name) {
                    return info.clone();
                }
            }
        }
        self.default.clone()
    }
}

/// Picks the certificate by SNI; falls back to the default one.
#[derive(Debug)]
struct Resolver {
    default: Option<Arc<CertifiedKey>>,
    by_name: Vec<(String, Arc<CertifiedKey>)>,
}

// === impl ServerTls ===

impl ServerTls {
    /// Loads every file once; the error says which file and why.
    pub fn load(settings: ServerTlsSettings) -> Result<Self, String> {
        let loaded = build(&settings)?;
        Ok(Self {
            settings,
            current: ArcSwap::from_pointee(loaded),
            started: OnceLock::new(),
        })
    }

    /// The config for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load().config.clone()
    }

    /// [`Self::config`] without ALPN, for opaque TCP (L4) over TLS.
    pub fn opaque_config(&self) -> Arc<ServerConfig> {
        self.current.load().opaque.clone()
    }

    /// [`ServerTls::config`] and the facts of its certificates, from the
    /// same load (a rotation in between cannot mix them).
    pub fn config_and_certs(&self) -> (Arc<ServerConfig>, Arc<LocalCerts>) {
        let loaded = self.current.load();
        (loaded.config.clone(), loaded.local.clone())
    }

    pub fn requires_client_cert(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    pub fn settings(&self) -> &ServerTlsSettings {
        &self.settings
    }

    /// Publishes the expiry gauges and starts watching the files. Called by
    /// every worker as it starts serving; only the first call does anything.
    pub fn start(self: &Arc<Self>, metrics: &Metrics) {
        self.started.get_or_init(|| {
            let labels = self.cert_labels();
            let gauges: Vec<Gauge> = labels
                .iter()
                .map(|cert| metrics.tls_cert_expiry("listener", &self.settings.listener, cert))
                .collect();
            for (g, t) in gauges.iter().zip(&self.current.load().expiry) {
                g.set(*t);
            }
            let weak: Weak<Self> = Arc::downgrade(self);
            let watch = watch::spawn(
                format!("listener \"{}\"", self.settings.listener),
                &self.files(),
                move || match weak.upgrade() {
                    Some(tls) => {
                        tls.reload();
                        true
                    }
                    None => false,
                },
            );
            Started {
                _watch: watch,
                gauges,
                errors: metrics.tls_listener_errors(&self.settings.listener),
            }
        });
    }

    /// Counts and logs one failed handshake.
    pub fn handshake_failed(&self, peer: std::net::SocketAddr, err: &std::io::Error) {
        let reason = super::reason(err);
        if let Some(s) = self.started.get() {
            s.errors.inc(reason);
        }
        // A client that connects and leaves without a word is routine
        // (health probes, port scans): keep those out of the info log.
        if reason == "eof" || reason == "io" {
            tracing::debug!(listener = %self.settings.listener, %peer, reason, "TLS handshake failed: {}", super::describe(err));
        } else {
            tracing::info!(listener = %self.settings.listener, %peer, reason, "TLS handshake failed: {}", super::describe(err));
        }
    }

    /// Counts a handshake that did not finish within the deadline.
    pub fn handshake_timed_out(&self, peer: std::net::SocketAddr, after: std::time::Duration) {
        if let Some(s) = self.started.get() {
            s.errors.inc("timeout");
        }
        tracing::info!(listener = %self.settings.listener, %peer, reason = "timeout", "TLS handshake failed: not finished within {after:?}");
    }

    fn cert_labels(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.settings.default.is_some() {
            out.push("default".to_string());
        }
        out.extend(self.settings.sni.iter().map(|s| s.sni.clone()));
        out
    }

    /// Every file, in the order [`build`] reads them (the fingerprint
    /// depends on it).
    fn files(&self) -> Vec<PathBuf> {
        let s = &self.settings;
        let mut out = Vec::new();
        for p in s.default.iter().chain(s.sni.iter().map(|c| &c.paths)) {
            out.push(p.cert.clone());
            out.push(p.key.clone());
        }
        out.extend(s.client_ca.iter().cloned());
        out
    }

    /// Rebuilds from the files; swaps only if they changed and load cleanly.
    fn reload(&self) {
        let name = &self.settings.listener;
        if PemReader::fingerprint_of(&self.files()).ok() == Some(self.current.load().fingerprint) {
            return;
        }
        match build(&self.settings) {
            Ok(new) => {
                if new.fingerprint == self.current.load().fingerprint {
                    return;
                }
                if let Some(s) = self.started.get() {
                    for (g, t) in s.gauges.iter().zip(&new.expiry) {
                        g.set(*t);
                    }
                }
                self.current.store(Arc::new(new));
                tracing::info!(listener = %name, "TLS certificates reloaded");
            }
            Err(e) => tracing::warn!(
                listener = %name,
                "TLS certificates changed but cannot be loaded; still serving the previous ones: {e}"
            ),
        }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn build(settings: &ServerTlsSettings) -> Result<Loaded, String> {
    let mut pem = PemReader::new();
    let mut expiry = Vec::new();
    let mut local = LocalCerts::default();
    let info = |ck: &CertifiedKey| {
        ck.end_entity_cert()
            .ok()
            .and_then(|c| super::CertInfo::parse(c))
            .map(Arc::new)
    };
    let default = match &settings.default {
        Some(paths) => {
            let (ck, facts) = pem.certified_key(paths)?;
            expiry.push(facts.not_after);
            local.default = info(&ck);
            Some(Arc::new(ck))
        }
        None => None,
    };
    let mut by_name = Vec::with_capacity(settings.sni.len());
    for entry in &settings.sni {
        let (ck, facts) = pem.certified_key(&entry.paths)?;
        expiry.push(facts.not_after);
        let pattern = entry.sni.to_ascii_lowercase();
        local.by_name.push((pattern.clone(), info(&ck)));
        by_name.push((pattern, Arc::new(ck)));
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(settings.min_version.versions())
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let roots = pem.roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Resolver { default, by_name }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless TLS 1.3 resumption: no cache shared between workers.
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| format!("session tickets: {e}"))?;
    let mut opaque = config.clone();
    opaque.alpn_protocols.clear();
    Ok(Loaded {
        config: Arc::new(config),
        opaque: Arc::new(opaque),
        local: Arc::new(local),
        fingerprint: pem.finish(),
        expiry,
    })
}

// === impl Resolver ===

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            for (pattern, ck) in &self.by_name {
                if sni_matches(pattern, name) {
                    return Some(ck.clone());
                }
            }
        }
        self.default.clone()
    }
}

/// `pattern` is lowercase; `*.example.com` matches any subdomain.
fn sni_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            name.len() > suffix.len()
                && name
                    .get(name.len() - suffix.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertPaths, MinVersion, SniCert};

    #[test]
    fn the_cheap_fingerprint_matches_the_build() {
        let dir = std::env::temp_dir().join(format!("wasp-tls-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = crate::certs::Ca::new("t", 10).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let leaf = crate::certs::Leaf {
            common_name: "s".into(),
            uris: vec![],
            dns: vec!["localhost".into()],
            ips: vec![],
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(1),
        };
        let mut paths = Vec::new();
        for name in ["a", "b"] {
            let (cert, key) = ca.issue(&leaf).unwrap();
            let p = CertPaths {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}-key.pem")),
            };
            std::fs::write(&p.cert, cert).unwrap();
            std::fs::write(&p.key, key).unwrap();
            paths.push(p);
        }
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let tls = ServerTls::load(ServerTlsSettings {
            listener: "l".into(),
            default: Some(paths[0].clone()),
            sni: vec![SniCert {
                sni: "b.test".into(),
                paths: paths[1].clone(),
            }],
            client_ca: Some(dir.join("ca.pem")),
            min_version: MinVersion::Tls12,
        })
        .unwrap();
        assert_eq!(
            PemReader::fingerprint_of(&tls.files()).unwrap(),
            tls.current.load().fingerprint
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An SNI certificate whose facts do not parse keeps its place: its
    /// connections get no local facts, not the default certificate's.
    #[test]
    fn local_facts_follow_the_resolvers_pick() {
        let default = Arc::new(crate::tls::CertInfo {
            subject: "CN=default".into(),
            ..Default::default()
        });
        let local = LocalCerts {
            default: Some(default.clone()),
            by_name: vec![("a.test".into(), None)],
        };
        assert_eq!(local.pick(Some("a.test")), None);
        assert_eq!(local.pick(Some("other.test")), Some(default));
    }

    #[test]
    fn sni_patterns() {
        assert!(sni_matches("a.example.com", "A.example.com"));
        assert!(!sni_matches("a.example.com", "b.example.com"));
        assert!(sni_matches("*.example.com", "x.example.com"));
        assert!(sni_matches("*.example.com", "y.x.example.com"));
        assert!(!sni_matches("*.example.com", "example.com"));
        assert!(!sni_matches("*.example.com", ".example.com"));
    }
}
