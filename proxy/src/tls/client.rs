//! TLS origination for one cluster: the trust roots (the cluster's `ca`, else
//! the webpki roots), the client certificate presented for mTLS, the SNI
//! sent, ALPN, and the identity check of `expect_identity`.
//!
//! Built when a snapshot is compiled (off the async runtimes), reloaded on the
//! `wasp-tls-watch` thread when the files change, read by a worker's
//! connector once per new upstream connection (never per request).
//!
//! Verification is always on unless `insecure_skip_verify = true`, which
//! is logged as a warning at every load. With `expect_identity`, the chain
//! is verified against the roots and the identity check replaces the host
//! name check: mesh certificates name workloads (`spiffe://...`), not the
//! addresses they happen to listen on.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::watch::{self, Watch};
use super::{provider, CertFacts, ClientTlsSettings, PemReader};
use crate::telemetry::{Metrics, TlsErrors};

/// A TLS handshake with an upstream failed; `forward` answers 502
/// `upstream_tls` when it finds this in an error's cause chain.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({code}): {detail}")]
pub struct UpstreamTlsError {
    /// The reason label (see [`super::reason`]).
    pub code: &'static str,
    pub detail: String,
}

/// The upstream certificate does not carry the expected identity.
#[derive(Debug, thiserror::Error)]
#[error("certificate identity is {presented}, expected {expected}")]
struct IdentityMismatch {
    expected: String,
    presented: String,
}

/// A cluster's TLS state: the current rustls config and its watcher.
pub struct ClientTls {
    settings: ClientTlsSettings,
    sni: Option<ServerName<'static>>,
    current: ArcSwap<Loaded>,
    started: OnceLock<Started>,
}

struct Loaded {
    config: Arc<ClientConfig>,
    /// The same with no ALPN: for bytes that are not HTTP (L4 TLS), where
    /// offering or requiring HTTP's protocol names would refuse a peer
    /// that names its own (Postgres direct SSL sends `postgresql`).
    opaque: Arc<ClientConfig>,
    fingerprint: [u8; 32],
    /// notAfter of the client certificate.
    expiry: Option<i64>,
    /// The client certificate's facts (`upstream.*_local_certificate`),
    /// parsed once per load, not per connection.
    local: Option<Arc<super::CertInfo>>,
}

struct Started {
    _watch: Watch,
    gauge: Option<Gauge>,
    errors: TlsErrors,
}

#[derive(Debug)]
struct Verifier {
    /// `None`: `insecure_skip_verify`.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    expect_identity: Option<String>,
}

// === impl ClientTls ===

impl ClientTls {
    pub fn load(settings: ClientTlsSettings) -> Result<Self, String> {
        let sni =
            match &settings.sni {
                Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                    format!("sni = \"{name}\" is not a valid DNS name or IP address")
                })?),
                None => None,
            };
        let loaded = build(&settings)?;
        Ok(Self {
            settings,
            sni,
            current: ArcSwap::from_pointee(loaded),
            started: OnceLock::new(),
        })
    }

    pub fn settings(&self) -> &ClientTlsSettings {
        &self.settings
    }

    /// The config for a new connection.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.current.load().config.clone()
    }

    /// [`Self::config`] with the facts of the client certificate it
    /// presents, from the same load (a rotation between the two cannot
    /// pair one certificate's config with another's facts).
    pub fn config_and_local(&self) -> (Arc<ClientConfig>, Option<Arc<super::CertInfo>>) {
        let loaded = self.current.load();
        (loaded.config.clone(), loaded.local.clone())
    }

    /// [`Self::config`] without ALPN, for opaque TCP (L4) over TLS.
    pub fn opaque_config(&self) -> Arc<ClientConfig> {
        self.current.load().opaque.clone()
    }

    /// The name to send as SNI and verify: the `sni` setting, else the
    /// endpoint's host (an IP address, verified against IP SANs).
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, UpstreamTlsError> {
        if let Some(n) = &self.sni {
            return Ok(n.clone());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|_| UpstreamTlsError {
            code: "bad_name",
            detail: format!("\"{host}\" cannot be used as a TLS server name; set tls.sni"),
        })
    }

    /// Publishes the expiry gauge and starts watching the files; only the
    /// first call does anything.
    pub fn start(self: &Arc<Self>, metrics: &Metrics) {
        self.started.get_or_init(|| {
            if self.settings.insecure_skip_verify {
                tracing::warn!(
                    cluster = %self.settings.cluster,
                    "tls.insecure_skip_verify = true: upstream certificates of this cluster are NOT verified; anyone on the path can impersonate it"
                );
            }
            let gauge = self
                .settings
                .client
                .as_ref()
                .map(|_| metrics.tls_cert_expiry("cluster", &self.settings.cluster, "client"));
            if let (Some(g), Some(t)) = (&gauge, self.current.load().expiry) {
                g.set(t);
            }
            let weak: Weak<Self> = Arc::downgrade(self);
            let watch = watch::spawn(
                format!("cluster \"{}\"", self.settings.cluster),
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
                gauge,
                errors: metrics.tls_cluster_errors(&self.settings.cluster),
            }
        });
    }

    /// Counts one failed upstream handshake.
    pub fn handshake_failed(&self, code: &'static str) {
        if let Some(s) = self.started.get() {
            s.errors.inc(code);
        }
    }

    /// Every file, in the order [`build`] reads them (the fingerprint
    /// depends on it).
    fn files(&self) -> Vec<PathBuf> {
        let s = &self.settings;
        let mut out: Vec<PathBuf> = s.ca.iter().cloned().collect();
        if let Some(c) = &s.client {
            out.push(c.cert.clone());
            out.push(c.key.clone());
        }
        out
    }

    fn reload(&self) {
        let name = &self.settings.cluster;
        if PemReader::fingerprint_of(&self.files()).ok() == Some(self.current.load().fingerprint) {
            return;
        }
        match build(&self.settings) {
            Ok(new) => {
                if new.fingerprint == self.current.load().fingerprint {
                    return;
                }
                if let (Some(s), Some(t)) = (self.started.get(), new.expiry) {
                    if let Some(g) = &s.gauge {
                        g.set(t);
                    }
                }
                self.current.store(Arc::new(new));
                tracing::info!(cluster = %name, "TLS certificates reloaded");
            }
            Err(e) => tracing::warn!(
                cluster = %name,
                "TLS files changed but cannot be loaded; still using the previous ones: {e}"
            ),
        }
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn build(settings: &ClientTlsSettings) -> Result<Loaded, String> {
    let mut pem = PemReader::new();
    let webpki = if settings.insecure_skip_verify {
        None
    } else {
        let roots = match &settings.ca {
            Some(ca) => pem.roots(ca)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("trust roots: {e}"))?;
        Some(v)
    };
    let verifier = Arc::new(Verifier {
        webpki,
        expect_identity: settings.expect_identity.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(super::MinVersion::Tls12.versions())
        .map_err(|e| format!("TLS versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let (mut config, expiry, local) = match &settings.client {
        Some(paths) => {
            let certs = pem.certs(&paths.cert)?;
            let key = pem.key(&paths.key)?;
            let facts = CertFacts::parse(&certs[0])
                .map_err(|e| format!("{}: {e}", paths.cert.display()))?;
            let local = super::CertInfo::parse(&certs[0]).map(Arc::new);
            let config = builder.with_client_auth_cert(certs, key).map_err(|e| {
                format!(
                    "{} with key {}: {e}",
                    paths.cert.display(),
                    paths.key.display()
                )
            })?;
            (config, Some(facts.not_after), local)
        }
        None => (builder.with_no_client_auth(), None, None),
    };
    config.alpn_protocols = if settings.h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let mut opaque = config.clone();
    opaque.alpn_protocols.clear();
    Ok(Loaded {
        config: Arc::new(config),
        opaque: Arc::new(opaque),
        fingerprint: pem.finish(),
        expiry,
        local,
    })
}

// === impl Verifier ===

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        let chain =
            webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        let Some(expected) = &self.expect_identity else {
            return chain;
        };
        match chain {
            // The chain is good; only the name differs, which the identity
            // check below replaces.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let facts = CertFacts::parse(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if facts.has_identity(expected) {
            return Ok(ServerCertVerified::assertion());
        }
        let presented = facts.identity().unwrap_or("(none)").to_string();
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(IdentityMismatch {
                expected: expected.clone(),
                presented,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
