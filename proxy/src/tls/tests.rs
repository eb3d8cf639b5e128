use super::*;
use crate::certs::{Ca, Leaf};

fn leaf(uris: &[&str], dns: &[&str]) -> Leaf {
    let now = time::OffsetDateTime::now_utc();
    Leaf {
        common_name: "t".into(),
        uris: uris.iter().map(|s| s.to_string()).collect(),
        dns: dns.iter().map(|s| s.to_string()).collect(),
        ips: vec![],
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(2),
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a certificate")
        .to_vec()
}

#[test]
fn identity_is_the_uri_san_else_the_dns_san() {
    let ca = Ca::new("t", 10).unwrap();
    let (both, _) = ca
        .issue(&leaf(
            &["spiffe://mesh.local/ns/default/sa/a"],
            &["a", "localhost"],
        ))
        .unwrap();
    let facts = CertFacts::parse(&der(&both)).unwrap();
    assert_eq!(
        facts.identity(),
        Some("spiffe://mesh.local/ns/default/sa/a")
    );
    assert!(facts.has_identity("localhost"));
    assert!(!facts.has_identity("spiffe://mesh.local/ns/default/sa/b"));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(facts.not_after > now + 86_400 && facts.not_after < now + 3 * 86_400);

    let (dns_only, _) = ca.issue(&leaf(&[], &["b.example"])).unwrap();
    let facts = CertFacts::parse(&der(&dns_only)).unwrap();
    assert_eq!(facts.identity(), Some("b.example"));
}

#[test]
fn allow_lists_match_exactly_or_by_prefix() {
    let allow = Allow::new([
        "spiffe://mesh.local/ns/default/sa/a".to_string(),
        "spiffe://mesh.local/ns/tools/*".to_string(),
    ]);
    assert!(allow.permits(Some("spiffe://mesh.local/ns/default/sa/a")));
    assert!(!allow.permits(Some("spiffe://mesh.local/ns/default/sa/ab")));
    assert!(allow.permits(Some("spiffe://mesh.local/ns/tools/sa/x")));
    assert!(!allow.permits(None));
}

#[test]
fn handshake_failures_get_short_reasons() {
    let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    assert_eq!(
        reason(&io(rustls::Error::NoCertificatesPresented)),
        "no_client_cert"
    );
    assert_eq!(
        reason(&io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired
        ))),
        "expired"
    );
    assert_eq!(
        reason(&io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))),
        "untrusted"
    );
    assert_eq!(
        reason(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        "eof"
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let dir = std::env::temp_dir().join(format!("wasp-tls-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("t", 10).unwrap();
    let (cert_a, _) = ca.issue(&leaf(&[], &["a"])).unwrap();
    let (_, key_b) = ca.issue(&leaf(&[], &["b"])).unwrap();
    std::fs::write(dir.join("a.pem"), cert_a).unwrap();
    std::fs::write(dir.join("b-key.pem"), key_b).unwrap();
    let settings = ServerTlsSettings {
        listener: "l".into(),
        default: Some(CertPaths {
            cert: dir.join("a.pem"),
            key: dir.join("b-key.pem"),
        }),
        sni: vec![],
        client_ca: None,
        min_version: MinVersion::Tls12,
    };
    let err = ServerTls::load(settings).expect_err("mismatched key");
    assert!(err.contains("a.pem") && err.contains("b-key.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream's certificate is worked out only when first read, and its
/// digest is of the DER as sent even when it does not parse (Envoy hashes
/// the raw certificate); an oversized one is not parsed at all.
#[test]
fn upstream_certificate_facts_are_lazy_and_the_digest_needs_no_parse() {
    let ca = Ca::new("t", 10).unwrap();
    let (pem, _) = ca.issue(&leaf(&[], &["upstream.local"])).unwrap();
    let good = der(&pem);
    let tls = UpstreamTls::with_peer("TLSv1.3", Some(&good), None);
    assert!(tls.peer.get().is_none(), "nothing parsed before a read");
    assert_eq!(tls.peer_sha256(), Some(sha256_hex(&good).as_str()));
    assert!(tls.peer.get().is_none(), "the digest needs no parse");
    let info = tls.peer().expect("parses");
    assert_eq!(info.dns_san.as_deref(), Some("upstream.local"));
    assert_eq!(&*info.sha256, tls.peer_sha256().unwrap());

    let junk = b"not a certificate".to_vec();
    let tls = UpstreamTls::with_peer("TLSv1.3", Some(&junk), None);
    assert!(tls.peer().is_none());
    let digest = tls.peer_sha256().expect("a digest of what was sent");
    assert_eq!(digest.len(), 64);
    assert_eq!(digest, sha256_hex(&junk));

    let mut big = good.clone();
    big.resize(MAX_PARSED_PEER_CERT + 1, 0);
    let tls = UpstreamTls::with_peer("TLSv1.3", Some(&big), None);
    assert!(tls.peer().is_none(), "over the bound: not parsed");
    assert!(tls.peer_sha256().is_some());

    let none = UpstreamTls::with_peer("TLSv1.3", None, None);
    assert!(none.peer().is_none() && none.peer_sha256().is_none());
}
