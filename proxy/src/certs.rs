//! `wasp certs`: development certificates for a mesh, made with rcgen.
//!
//! ```text
//! wasp certs --out certs --ca-name mesh --service productpage,reviews
//! ```
//!
//! writes `mesh-ca.pem` / `mesh-ca-key.pem` (a CA) and, per service,
//! `NAME.pem` / `NAME-key.pem`: an ECDSA P-256 certificate with the URI SAN
//! `spiffe://<trust-domain>/ns/<namespace>/sa/NAME`, the DNS SANs `NAME` and
//! `localhost`, and the IP SAN `127.0.0.1`, usable both as a server and as
//! a client certificate. An existing CA in `--out` is reused (its key signs
//! the new certificates), so services can be added later. For development
//! and tests only: the CA key sits on disk next to everything else.
//!
//! Runs on the main thread of the CLI, before and without any runtime.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The arguments of `wasp certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write the PEM files to (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// The CA's name: files are `<ca-name>-ca.pem` and `<ca-name>-ca-key.pem`.
    #[arg(long, default_value = "mesh")]
    pub ca_name: String,
    /// Services to issue certificates for, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub service: Vec<String>,
    /// The SPIFFE trust domain of the identities.
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: String,
    /// The namespace part of the identities.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Validity of the service certificates, in days (the CA gets ten times that).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// What a leaf certificate says.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub common_name: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The entry point of `wasp certs`.
pub fn main(args: &CertsArgs) -> ExitCode {
    match generate(args) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Writes the CA (unless it exists) and one certificate per service;
/// returns the files written.
pub fn generate(args: &CertsArgs) -> anyhow::Result<Vec<PathBuf>> {
    for s in &args.service {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("service name \"{s}\": use letters, digits and '-'");
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let ca_cert = args.out.join(format!("{}-ca.pem", args.ca_name));
    let ca_key = args.out.join(format!("{}-ca-key.pem", args.ca_name));
    let mut written = Vec::new();
    let ca = if ca_cert.exists() && ca_key.exists() {
        let key = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?;
        Ca::from_key(&args.ca_name, &key)
            .with_context(|| format!("cannot use the CA key {}", ca_key.display()))?
    } else {
        let ca = Ca::new(&args.ca_name, args.days.saturating_mul(10))?;
        write(&ca_cert, &ca.cert_pem(), &mut written)?;
        write_private(&ca_key, &ca.key_pem(), &mut written)?;
        ca
    };
    let now = OffsetDateTime::now_utc();
    for name in &args.service {
        let leaf = Leaf {
            common_name: name.clone(),
            uris: vec![format!(
                "spiffe://{}/ns/{}/sa/{}",
                args.trust_domain, args.namespace, name
            )],
            dns: vec![name.clone(), "localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(args.days)),
        };
        let (cert, key) = ca.issue(&leaf)?;
        write(&args.out.join(format!("{name}.pem")), &cert, &mut written)?;
        write_private(
            &args.out.join(format!("{name}-key.pem")),
            &key,
            &mut written,
        )?;
    }
    Ok(written)
}

fn write(path: &Path, text: &str, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path.to_path_buf());
    Ok(())
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    write(path, text, written)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

// === impl Ca ===

impl Ca {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn new(name: &str, days: u32) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("cannot generate a key")?;
        Self::with_key(name, key, days)
    }

    /// Rebuilds the CA around an existing key (PEM). The certificate made
    /// here has the same subject and key identifier as the one on disk,
    /// so what it signs chains to that one.
    pub fn from_key(name: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("not a PEM private key rcgen can use")?;
        Self::with_key(name, key, 3650)
    }

    fn with_key(name: &str, key: KeyPair, days: u32) -> anyhow::Result<Self> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} CA"));
        dn.push(DnType::OrganizationName, "wasp development mesh");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days));
        let cert = params
            .self_signed(&key)
            .context("cannot sign the CA certificate")?;
        Ok(Self { key, cert })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a leaf certificate (server and client auth); returns the
    /// certificate and its new private key, both PEM.
    pub fn issue(&self, leaf: &Leaf) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate().context("cannot generate a key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.common_name.clone());
        params.distinguished_name = dn;
        for u in &leaf.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.clone().try_into().context("URI SAN")?));
        }
        for d in &leaf.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.clone().try_into().context("DNS SAN")?));
        }
        for ip in &leaf.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("cannot sign the certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_certificates_with_the_mesh_identity() {
        let dir = std::env::temp_dir().join(format!("wasp-certs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = CertsArgs {
            out: dir.clone(),
            ca_name: "mesh".into(),
            service: vec!["reviews".into(), "productpage".into()],
            trust_domain: "mesh.local".into(),
            namespace: "default".into(),
            days: 30,
        };
        let files = generate(&args).unwrap();
        assert_eq!(files.len(), 6, "{files:?}");
        let ca_before = std::fs::read(dir.join("mesh-ca.pem")).unwrap();
        let mut pem = crate::tls::PemReader::new();
        let certs = pem.certs(&dir.join("reviews.pem")).unwrap();
        let facts = crate::tls::CertFacts::parse(&certs[0]).unwrap();
        assert_eq!(
            facts.identity(),
            Some("spiffe://mesh.local/ns/default/sa/reviews")
        );
        assert!(facts.has_identity("reviews") && facts.has_identity("localhost"));

        // A second run reuses the CA, and its certificates still chain to it.
        let args = CertsArgs {
            service: vec!["ratings".into()],
            ..args
        };
        generate(&args).unwrap();
        assert_eq!(std::fs::read(dir.join("mesh-ca.pem")).unwrap(), ca_before);
        let roots = std::sync::Arc::new(pem.roots(&dir.join("mesh-ca.pem")).unwrap());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let leaf = pem.certs(&dir.join("ratings.pem")).unwrap();
        verifier
            .verify_client_cert(&leaf[0], &[], rustls::pki_types::UnixTime::now())
            .expect("the reissued CA signs certificates that chain to the original");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
