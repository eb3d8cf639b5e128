//! TLS through the real binary: termination (TLS 1.3, ALPN h2, SNI), client
//! certificates (missing, untrusted, expired), identity allow lists, TLS
//! towards upstreams (wrong name, wrong identity), a two-sidecar mTLS hop
//! with certificates from `wasp certs`, certificate rotation under load, a
//! config reload that changes the certificate, and the peer's identity
//! reaching a Wasm filter as `source.principal`.
//!
//! Certificates are made in the test (rcgen through `wasp::certs`) or by the
//! `wasp certs` command; clients are rustls + hyper, and curl when present.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use support::upstream::TestUpstream;
use support::*;
use wasp::certs::{Ca, Leaf};

const FRONT: &str = "spiffe://mesh.local/ns/default/sa/front";
const REVIEWS: &str = "spiffe://mesh.local/ns/default/sa/reviews";

// ---- certificates -----------------------------------------------------------

/// A CA and the files of the certificates it issued, in a temp dir.
struct Pki {
    dir: TempDir,
    ca: Ca,
    name: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = TempDir::new(&format!("pki-{name}"));
        let ca = Ca::new(name, 30).unwrap();
        std::fs::write(dir.path().join(format!("{name}-ca.pem")), ca.cert_pem()).unwrap();
        Self {
            dir,
            ca,
            name: name.into(),
        }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    /// Issues `file.pem` / `file-key.pem` valid from `from` to `to` days from now.
    fn issue_valid(
        &self,
        file: &str,
        uri: Option<&str>,
        dns: &[&str],
        from: i64,
        to: i64,
    ) -> (PathBuf, PathBuf) {
        let now = time::OffsetDateTime::now_utc();
        let leaf = Leaf {
            common_name: file.into(),
            uris: uri.map(str::to_string).into_iter().collect(),
            dns: dns.iter().map(|d| d.to_string()).collect(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            not_before: now + time::Duration::days(from),
            not_after: now + time::Duration::days(to),
        };
        let (cert, key) = self.ca.issue(&leaf).unwrap();
        let c = self.dir.path().join(format!("{file}.pem"));
        let k = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    fn issue(&self, file: &str, uri: Option<&str>, dns: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_valid(file, uri, dns, -1, 2)
    }
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client trusting `ca`, optionally presenting `client`.
fn client_config(
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in pem_certs(ca) {
        roots.add(c).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(pem_certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
const H1: &[&[u8]] = &[b"http/1.1"];

// ---- a TLS HTTP client --------------------------------------------------------

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection over TLS, and what its handshake settled.
struct TlsConn {
    sender: Sender,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    server_cert: Vec<u8>,
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &str,
) -> Result<TlsConn, String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let version = session.protocol_version();
        let server_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Ok(TlsConn {
            sender,
            alpn,
            version,
            server_cert,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "connect timed out".to_string())?
}

impl TlsConn {
    async fn get(&mut self, host: &str, path: &str) -> Result<Answer, String> {
        let work = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = http::Request::get(path)
                        .header("host", host)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = http::Request::get(format!("https://{host}{path}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    s.send_request(req).await
                }
            }
            .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Answer {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .map_err(|_| "request timed out".to_string())?
    }
}

/// Connects, sends one GET, returns the answer (or why there was none).
async fn tls_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &str,
    path: &str,
) -> Result<Answer, String> {
    let mut conn = tls_connect(addr, config, sni).await?;
    conn.get(sni, path).await
}

/// Polls `cond` every 50 ms for up to `limit`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A "mesh" CA and certificates for `front` and `reviews`, made by
/// `wasp certs` as an operator would, in a fresh directory.
fn mesh_certs(name: &str) -> TempDir {
    let certs = TempDir::new(name);
    let dir = certs.path().as_os_str();
    wasp_ok([
        "certs".as_ref(),
        "--out".as_ref(),
        dir,
        "--ca-name".as_ref(),
        "mesh".as_ref(),
        "--service".as_ref(),
        "front,reviews".as_ref(),
    ]);
    certs
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

// ---- termination ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_h2_and_sni_selection() {
    let app = TestUpstream::start("app").await;
    let pki = Pki::new("mesh");
    let (cert, key) = pki.issue("reviews", Some(REVIEWS), &["reviews", "localhost"]);
    let (other_cert, other_key) = pki.issue("other", None, &["other.test"]);
    let (port, strict) = (free_port(), free_port());
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "edge"
bind = "127.0.0.1:{port}"
limits = {{ header_timeout = "500ms" }}
tls = {{ cert = "{cert}", key = "{key}", certs = [ {{ sni = "other.test", cert = "{other_cert}", key = "{other_key}" }} ] }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[[listeners]]
name = "strict"
bind = "127.0.0.1:{strict}"
tls = {{ cert = "{cert}", key = "{key}", min_version = "1.3" }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#,
        cert = cert.display(),
        key = key.display(),
        other_cert = other_cert.display(),
        other_key = other_key.display(),
        app = app.addr,
    ));

    // TLS 1.3 with h2 by ALPN; the default certificate for "localhost".
    let config = client_config(&pki.ca_path(), None, H2_H1, BOTH);
    let mut conn = tls_connect(addr(port), config.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(conn.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(conn.server_cert, pem_certs(&cert)[0].to_vec());
    let r = conn.get("localhost", "/hello").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("x-forwarded-proto: https"), "{}", r.body);
    assert!(r.body.contains("via: 2.0 wasp"), "{}", r.body);
    // Keep-alive: a second request on the same connection.
    assert_eq!(conn.get("localhost", "/again").await.unwrap().status, 200);
    // A new connection from the same client resumes the session.
    let mut again = tls_connect(addr(port), config.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(
        again.get("localhost", "/resumed").await.unwrap().status,
        200
    );

    // SNI picks the other certificate; HTTP/1.1 when the client offers only that.
    let h1 = client_config(&pki.ca_path(), None, H1, BOTH);
    let mut conn = tls_connect(addr(port), h1.clone(), "other.test")
        .await
        .unwrap();
    assert_eq!(conn.server_cert, pem_certs(&other_cert)[0].to_vec());
    assert_eq!(conn.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(conn.get("other.test", "/").await.unwrap().status, 200);

    // TLS 1.2 works by default, and is refused where min_version = "1.3".
    let tls12 = client_config(&pki.ca_path(), None, H2_H1, &[&rustls::version::TLS12]);
    let conn = tls_connect(addr(port), tls12.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(conn.version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(tls_get(addr(strict), tls12, "localhost", "/")
        .await
        .is_err());
    assert!(eventually(Duration::from_secs(5), || {
        metric_value(
            &wasp.metrics(),
            "wasp_tls_handshake_errors_total",
            &["listener=\"strict\"", "reason=\"incompatible\""],
        ) == Some(1.0)
    }));

    // A plaintext client on the TLS port gets no HTTP answer, and is counted.
    let raw = raw_exchange(
        addr(port),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(!raw.contains("200"), "{raw}");
    assert!(
        eventually(Duration::from_secs(5), || {
            metric_value(
                &wasp.metrics(),
                "wasp_tls_handshake_errors_total",
                &["reason=\"not_tls\""],
            ) == Some(1.0)
        }),
        "{}",
        wasp.metrics()
    );

    // The header timeout still answers 408 through TLS.
    let tcp = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(h1)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 408") && out.contains("x-wasp-error: header_timeout"),
        "{out:?}"
    );

    // Certificate expiry and handshakes in /metrics.
    let metrics = wasp.metrics();
    let expiry = metric_value(
        &metrics,
        "wasp_tls_certificate_expiry_timestamp_seconds",
        &["scope=\"listener\"", "name=\"edge\"", "cert=\"other.test\""],
    )
    .expect("expiry gauge");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(
        expiry > now + 86_400.0 && expiry < now + 3.0 * 86_400.0,
        "{expiry}"
    );
    assert!(
        metric_value(
            &metrics,
            "wasp_tls_handshakes_total",
            &["listener=\"edge\""]
        )
        .unwrap_or(0.0)
            >= 4.0
    );

    // curl, a client the proxy did not write: TLS 1.3 and h2.
    if Command::new("curl").arg("--version").output().is_ok() {
        let url = format!("https://localhost:{port}/curl");
        let out = tokio::task::spawn_blocking({
            let ca = pki.ca_path();
            move || {
                Command::new("curl")
                    .args(["-sv", "--http2", "--max-time", "10", "--cacert"])
                    .arg(ca)
                    .args(["--resolve", &format!("localhost:{port}:127.0.0.1"), &url])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("TLSv1.3"), "{err}");
        assert!(
            err.contains("ALPN: server accepted h2")
                || err.contains("ALPN, server accepted to use h2"),
            "{err}"
        );
        assert!(body.contains("x-forwarded-proto: https"), "{body}");
    } else {
        eprintln!("curl not found: skipping the curl check");
    }

    // openssl s_client: the SNI certificate, TLS 1.3, h2, verified.
    if Command::new("openssl").arg("version").output().is_ok() {
        let ca = pki.ca_path();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("openssl")
                .args(["s_client", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-servername", "other.test", "-alpn", "h2", "-CAfile"])
                .arg(ca)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("TLSv1.3"), "{text}");
        assert!(text.contains("ALPN protocol: h2"), "{text}");
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
        assert!(text.contains("CN = other"), "{text}");
    } else {
        eprintln!("openssl not found: skipping the s_client check");
    }
}

// ---- client certificates ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_rejects_bad_client_certs_and_checks_identities() {
    let app = TestUpstream::start("app").await;
    let pki = Pki::new("mesh");
    let rogue = Pki::new("rogue");
    let (cert, key) = pki.issue("reviews", Some(REVIEWS), &["localhost"]);
    let front = pki.issue("front", Some(FRONT), &["front"]);
    let ops = pki.issue(
        "ops",
        Some("spiffe://mesh.local/ns/default/sa/ops"),
        &["ops"],
    );
    let stranger = pki.issue(
        "stranger",
        Some("spiffe://mesh.local/ns/default/sa/stranger"),
        &["stranger"],
    );
    let dns_only = pki.issue("dnsonly", None, &["tools.internal"]);
    let expired = pki.issue_valid("expired", Some(FRONT), &["front"], -10, -1);
    let untrusted = rogue.issue("front-rogue", Some(FRONT), &["front"]);
    let port = free_port();
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
tls = {{ cert = "{cert}", key = "{key}", client_ca = "{ca}", allow = ["{FRONT}", "spiffe://mesh.local/ns/default/sa/ops", "tools.*"] }}
  [[listeners.routes]]
  name = "admin"
  match = {{ prefix = "/admin" }}
  cluster = "app"
  allow = ["spiffe://mesh.local/ns/default/sa/ops"]
  [[listeners.routes]]
  name = "all"
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#,
        cert = cert.display(),
        key = key.display(),
        ca = pki.ca_path().display(),
        app = app.addr,
    ));
    let inbound = addr(port);
    let with = |c: &(PathBuf, PathBuf)| client_config(&pki.ca_path(), Some(c), H2_H1, BOTH);

    // Allowed identity: passes, and the upstream request is https.
    let front_config = with(&front);
    let r = tls_get(inbound, front_config.clone(), "localhost", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("x-forwarded-proto: https"), "{}", r.body);
    // A resumed session keeps the identity it was established with.
    let r = tls_get(inbound, front_config, "localhost", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        metric_value(
            &wasp.metrics(),
            "wasp_tls_resumed_handshakes_total",
            &["listener=\"inbound\""]
        ),
        Some(1.0)
    );
    // A DNS SAN identity matched by prefix.
    assert_eq!(
        tls_get(inbound, with(&dns_only), "localhost", "/x")
            .await
            .unwrap()
            .status,
        200
    );

    // A valid certificate whose identity the listener does not allow: 403.
    let r = tls_get(inbound, with(&stranger), "localhost", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-wasp-error"), Some("unauthorized_peer"));
    assert!(
        r.body
            .contains("spiffe://mesh.local/ns/default/sa/stranger"),
        "{}",
        r.body
    );

    // Route-level allow: front may call the listener but not /admin; ops may.
    let r = tls_get(inbound, with(&front), "localhost", "/admin/x")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (403, Some("unauthorized_peer")),
        "{r:?}"
    );
    assert_eq!(
        tls_get(inbound, with(&ops), "localhost", "/admin/x")
            .await
            .unwrap()
            .status,
        200
    );

    // Missing, untrusted and expired client certificates never get a response.
    let none = client_config(&pki.ca_path(), None, H2_H1, BOTH);
    for (what, config, reason) in [
        ("missing", none, "no_client_cert"),
        ("untrusted", with(&untrusted), "untrusted"),
        ("expired", with(&expired), "expired"),
    ] {
        let r = tls_get(inbound, config, "localhost", "/x").await;
        assert!(r.is_err(), "{what} client certificate got an answer: {r:?}");
        let label = format!("reason=\"{reason}\"");
        assert!(
            eventually(Duration::from_secs(5), || {
                metric_value(
                    &wasp.metrics(),
                    "wasp_tls_handshake_errors_total",
                    &["listener=\"inbound\"", &label],
                ) == Some(1.0)
            }),
            "{what}: {}",
            wasp.metrics()
        );
        assert!(
            eventually(Duration::from_secs(5), || wasp
                .log_text()
                .lines()
                .any(|l| l.contains("TLS handshake failed") && l.contains(reason))),
            "{what}: no log line; log:\n{}",
            wasp.log_text()
        );
    }
    let log = wasp.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("TLS handshake failed") && l.contains("expired"))
        .unwrap();
    assert!(
        line.contains("inbound") && line.contains("127.0.0.1"),
        "{line}"
    );
    assert_eq!(
        app.requests(),
        4,
        "only the allowed requests reached the app"
    );
}

// ---- two sidecars, TLS towards upstreams ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecar_mtls_hop_and_upstream_verification() {
    let app = TestUpstream::start("reviews-app").await;
    // Certificates from the CLI, as an operator would make them.
    let certs = mesh_certs("certs");
    let p = |f: &str| certs.path().join(f).display().to_string();
    for f in [
        "mesh-ca.pem",
        "mesh-ca-key.pem",
        "front.pem",
        "front-key.pem",
        "reviews.pem",
        "reviews-key.pem",
    ] {
        assert!(certs.path().join(f).exists(), "{f} missing");
    }

    let inbound_port = free_port();
    let inbound = Wasp::start(&format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{inbound_port}"
tls = {{ cert = "{cert}", key = "{key}", client_ca = "{ca}", allow = ["{FRONT}"] }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "local_app"

[clusters.local_app]
endpoints = ["{app}"]
"#,
        cert = p("reviews.pem"),
        key = p("reviews-key.pem"),
        ca = p("mesh-ca.pem"),
        app = app.addr,
    ));

    let outbound_port = free_port();
    let tls = |extra: &str| {
        format!(
            r#"tls = {{ ca = "{ca}", cert = "{cert}", key = "{key}"{extra} }}"#,
            ca = p("mesh-ca.pem"),
            cert = p("front.pem"),
            key = p("front-key.pem"),
        )
    };
    let outbound = Wasp::start(&format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{outbound_port}"
  [[listeners.routes]]
  match = {{ host = "reviews" }}
  cluster = "reviews"
  [[listeners.routes]]
  match = {{ host = "reviews-h2" }}
  cluster = "reviews-h2"
  [[listeners.routes]]
  match = {{ host = "wrong-name" }}
  cluster = "wrong-name"
  [[listeners.routes]]
  match = {{ host = "wrong-identity" }}
  cluster = "wrong-identity"
  [[listeners.routes]]
  match = {{ host = "no-client-cert" }}
  cluster = "no-client-cert"
  [[listeners.routes]]
  match = {{ host = "by-address" }}
  cluster = "by-address"
  [[listeners.routes]]
  match = {{ host = "public-roots" }}
  cluster = "public-roots"
  [[listeners.routes]]
  match = {{ host = "insecure" }}
  cluster = "insecure"

[clusters.reviews]
endpoints = ["127.0.0.1:{inbound_port}"]
{reviews}

[clusters.reviews-h2]
endpoints = ["127.0.0.1:{inbound_port}"]
protocol = "http2"
{reviews}

[clusters.wrong-name]
endpoints = ["127.0.0.1:{inbound_port}"]
{wrong_name}

[clusters.wrong-identity]
endpoints = ["127.0.0.1:{inbound_port}"]
{wrong_identity}

[clusters.no-client-cert]
endpoints = ["127.0.0.1:{inbound_port}"]
tls = {{ ca = "{ca}", expect_identity = "{REVIEWS}" }}

[clusters.by-address]
endpoints = ["127.0.0.1:{inbound_port}"]
{by_address}

[clusters.public-roots]
endpoints = ["127.0.0.1:{inbound_port}"]
tls = {{ cert = "{front}", key = "{front_key}" }}

[clusters.insecure]
endpoints = ["127.0.0.1:{inbound_port}"]
tls = {{ cert = "{front}", key = "{front_key}", insecure_skip_verify = true }}
"#,
        by_address = tls(""),
        front = p("front.pem"),
        front_key = p("front-key.pem"),
        reviews = tls(&format!(r#", expect_identity = "{REVIEWS}""#)),
        wrong_name = tls(r#", sni = "wrong.example""#),
        wrong_identity = tls(r#", expect_identity = "spiffe://mesh.local/ns/default/sa/ratings""#),
        ca = p("mesh-ca.pem"),
    ));
    let client = h1_client();
    let out = addr(outbound_port);

    // Expiry gauges are published at start, before any traffic.
    assert!(eventually(Duration::from_secs(5), || {
        let m = outbound.metrics();
        metric_value(
            &m,
            "wasp_tls_certificate_expiry_timestamp_seconds",
            &[
                "scope=\"cluster\"",
                "name=\"reviews-h2\"",
                "cert=\"client\"",
            ],
        )
        .is_some()
    }));
    assert!(metric_value(
        &inbound.metrics(),
        "wasp_tls_certificate_expiry_timestamp_seconds",
        &["scope=\"listener\"", "name=\"inbound\"", "cert=\"default\""],
    )
    .is_some());

    // The hop works, over HTTP/1.1 and over h2 picked by ALPN.
    let r = get(&client, out, "reviews", "/ping").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-upstream"), Some("reviews-app"));
    assert!(r.body.contains("via: 1.1 wasp, 1.1 wasp"), "{}", r.body);
    let r = get(&client, out, "reviews-h2", "/ping").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("via: 1.1 wasp, 2.0 wasp"),
        "h2 between the sidecars: {}",
        r.body
    );

    // Keep-alive between the sidecars: many requests, few handshakes.
    for _ in 0..20 {
        assert_eq!(get(&client, out, "reviews", "/again").await.status, 200);
    }
    let handshakes =
        metric_value(&inbound.metrics(), "wasp_tls_handshakes_total", &[]).unwrap_or(0.0);
    assert!(handshakes <= 4.0, "{handshakes} handshakes for 22 requests");

    // Verification failures are 502 upstream_tls, with the reason.
    let r = get(&client, out, "wrong-name", "/").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (502, Some("upstream_tls")),
        "{r:?}"
    );
    assert!(
        r.body.contains("wrong_name") || r.body.contains("NotValidForName"),
        "{}",
        r.body
    );
    let r = get(&client, out, "wrong-identity", "/").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (502, Some("upstream_tls")),
        "{r:?}"
    );
    assert!(
        r.body
            .contains("expected spiffe://mesh.local/ns/default/sa/ratings"),
        "{}",
        r.body
    );
    let m = outbound.metrics();
    assert_eq!(
        metric_value(
            &m,
            "wasp_tls_upstream_handshake_errors_total",
            &["cluster=\"wrong-identity\"", "reason=\"wrong_identity\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "wasp_tls_certificate_expiry_timestamp_seconds",
            &["scope=\"cluster\"", "name=\"reviews\"", "cert=\"client\""]
        )
        .is_some(),
        "{m}"
    );

    // Without a client certificate the inbound sidecar refuses the hop
    // (with TLS 1.3, by an alert after the client's side of the handshake).
    let r = get(&client, out, "no-client-cert", "/").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (502, Some("upstream_tls")),
        "{r:?}"
    );
    assert!(r.body.contains("CertificateRequired"), "{}", r.body);
    assert!(eventually(Duration::from_secs(5), || {
        metric_value(
            &inbound.metrics(),
            "wasp_tls_handshake_errors_total",
            &["reason=\"no_client_cert\""],
        ) == Some(1.0)
    }));

    // No sni and no expect_identity: the endpoint's IP address is verified
    // against the certificate's IP SANs (127.0.0.1 from `wasp certs`).
    assert_eq!(get(&client, out, "by-address", "/").await.status, 200);
    // Without `ca`, the webpki roots: a mesh certificate is not trusted.
    let r = get(&client, out, "public-roots", "/").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (502, Some("upstream_tls")),
        "{r:?}"
    );
    assert!(r.body.contains("untrusted"), "{}", r.body);
    // insecure_skip_verify: the same untrusted certificate is accepted, and
    // the log said so loudly at start.
    assert_eq!(get(&client, out, "insecure", "/").await.status, 200);
    assert!(
        outbound
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("insecure") && l.contains("NOT verified")),
        "{}",
        outbound.log_text()
    );
    assert_eq!(app.requests(), 24);
}

// ---- rotation --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_rotation_under_load_fails_no_request() {
    let app = TestUpstream::start("app").await;
    let pki = Pki::new("mesh");
    let (cert, key) = pki.issue_valid("server", None, &["localhost"], -1, 2);
    let port = free_port();
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "edge"
bind = "127.0.0.1:{port}"
tls = {{ cert = "{cert}", key = "{key}" }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#,
        cert = cert.display(),
        key = key.display(),
        app = app.addr,
    ));
    let config = client_config(&pki.ca_path(), None, H1, BOTH);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (config, ok, failed) = (config.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            // New connections all along (so each rotation is picked up),
            // a few keep-alive requests on each.
            while Instant::now() < stop {
                let mut conn = match tls_connect(addr(port), config.clone(), "localhost").await {
                    Ok(c) => c,
                    Err(e) => {
                        failed.lock().unwrap().push(e);
                        continue;
                    }
                };
                for _ in 0..4 {
                    match conn.get("localhost", "/r").await {
                        Ok(a) if a.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(a) => failed.lock().unwrap().push(format!("status {}", a.status)),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            }
        }));
    }
    // Two rotations while the clients run, each written in place
    // (certificate, then key) the way `cp` would.
    let mut last = Vec::new();
    for (i, days) in [(2, 5i64), (3, 7)] {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let (c, k) = pki.issue_valid(&format!("gen{i}"), None, &["localhost"], -1, days);
        std::fs::copy(&c, &cert).unwrap();
        std::fs::copy(&k, &key).unwrap();
        last = pem_certs(&c)[0].to_vec();
    }
    for c in clients {
        c.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests in 3 s");

    // New connections get the newest certificate, and the gauge follows.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = tls_connect(addr(port), config.clone(), "localhost")
            .await
            .unwrap()
            .server_cert;
        if served == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the newest certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reloads = wasp.log_text().matches("TLS certificates reloaded").count();
    assert!(reloads >= 2, "{reloads} reloads; log:\n{}", wasp.log_text());
    let expiry = metric_value(
        &wasp.metrics(),
        "wasp_tls_certificate_expiry_timestamp_seconds",
        &["name=\"edge\""],
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(expiry > now + 6.0 * 86_400.0, "gauge not updated: {expiry}");

    // A broken certificate changes nothing, and the log says why.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || wasp
        .log_text()
        .contains("cannot be loaded; still serving the previous ones")));
    let conn = tls_connect(addr(port), config.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(conn.server_cert, last);
    println!("rotation under load: {ok} requests, 0 failed, {reloads} reloads");
}

// ---- configuration errors -------------------------------------------------------------

/// An HTTP/2 upstream over TLS (ALPN `h2` only) that counts the TCP
/// connections it accepts and takes its time over each handshake, so
/// requests sent together all arrive while the first connection opens.
async fn slow_h2_tls_upstream(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let (cert, key) = pki.issue("h2-upstream", None, &["h2-upstream.test"]);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pem_certs(&cert),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let v = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(v),
                        )))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (at, accepted)
}

/// A cold pool to a TLS cluster speaking HTTP/2 (`protocol = "http2"`,
/// ALPN `h2`): requests that arrive while its connection is still being
/// dialled wait for that one dial instead of each opening their own, so
/// the upstream accepts exactly one connection and every request is
/// answered over HTTP/2 on it. A regression guard for the shared dial
/// (it passes on the branch's base too: an `http2` cluster already shared
/// its dial there; the ALPN-chosen HTTP/2 path it replaced was removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_a_cold_tls_h2_pool_share_one_connection() {
    let pki = Pki::new("h2pool");
    let (upstream, accepted) = slow_h2_tls_upstream(&pki).await;
    let port = free_port();
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "in"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  cluster = "h2"

[clusters.h2]
endpoints = ["{upstream}"]
protocol = "http2"
tls = {{ ca = "{ca}", sni = "h2-upstream.test" }}
"#,
        ca = pki.ca_path().display(),
    ));
    let client = h1_client();
    let answers = futures_util::future::join_all((0..8).map(|i| {
        get(
            &client,
            addr(port),
            "h2",
            if i % 2 == 0 { "/a" } else { "/b" },
        )
    }))
    .await;
    for r in &answers {
        assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
        assert_eq!(r.body, "HTTP/2.0", "{r:?}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one dial for the whole burst\n{}",
        wasp.log_text()
    );
}

#[test]
fn tls_config_errors_name_the_place() {
    let dir = TempDir::new("tls-config");
    let check = |text: &str| {
        let path = dir.path().join("wasp.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(WASP)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let listener = |tls: &str, route_extra: &str| {
        format!(
            "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:1\"\ntls = {tls}\n  [[listeners.routes]]\n  match = {{ prefix = \"/\" }}\n  cluster = \"a\"\n{route_extra}\n[clusters.a]\nendpoints = [\"127.0.0.1:2\"]\n"
        )
    };
    let (code, err) = check(&listener(
        r#"{ cert = "nope.pem", key = "nope-key.pem" }"#,
        "",
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("wasp.toml:4:7") && err.contains("nope.pem"),
        "{err}"
    );

    let pki = Pki::new("mesh");
    let (cert, key) = pki.issue("s", None, &["localhost"]);
    let good = format!(
        r#"{{ cert = "{}", key = "{}" }}"#,
        cert.display(),
        key.display()
    );
    let (code, err) = check(&listener(&good, "  allow = [\"x\"]"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("wasp.toml:8:11") && err.contains("client_ca"),
        "{err}"
    );

    let (code, err) = check(&listener(&good.replace(" }", ", allow = [\"x\"] }"), ""));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls.allow needs tls.client_ca"), "{err}");

    let (code, err) = check(&listener(&good.replace(" }", ", ciphers = [] }"), ""));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `ciphers`"), "{err}");

    let (code, err) = check(&format!(
        "[clusters.a]\nendpoints = [\"127.0.0.1:2\"]\ntls = {{ ca = \"{}\", insecure_skip_verify = true }}\n",
        pki.ca_path().display()
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("wasp.toml:3:7") && err.contains("insecure_skip_verify"),
        "{err}"
    );

    let (code, err) = check(&listener(&good, ""));
    assert_eq!(code, Some(0), "{err}");
}

// ---- config reload ------------------------------------------------------------------------

/// `wasp check` shows each listener's and cluster's TLS: what is served,
/// who must present a certificate, whom the cluster trusts and expects.
#[test]
fn check_prints_tls_and_allow() {
    let certs = mesh_certs("check-certs");
    let p = |f: &str| certs.path().join(f).display().to_string();
    let path = certs.path().join("wasp.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[listeners]]
name = "inbound"
bind = "127.0.0.1:1"
tls = {{ cert = "{reviews}", key = "{reviews_key}", client_ca = "{ca}", allow = ["{FRONT}"], min_version = "1.3" }}
  [[listeners.routes]]
  cluster = "reviews"

[clusters.reviews]
endpoints = ["127.0.0.1:2"]
tls = {{ ca = "{ca}", cert = "{front}", key = "{front_key}", expect_identity = "{REVIEWS}" }}
"#,
            reviews = p("reviews.pem"),
            reviews_key = p("reviews-key.pem"),
            front = p("front.pem"),
            front_key = p("front-key.pem"),
            ca = p("mesh-ca.pem"),
        ),
    )
    .unwrap();
    let out = wasp_ok(["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(prefix) && l.contains(".pem"))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"))
            .to_string()
    };
    let listener_tls = stdout
        .lines()
        .find(|l| l.contains("mTLS: client certificates from"))
        .unwrap_or_else(|| panic!("listener tls missing:\n{stdout}"));
    assert!(listener_tls.contains(&p("reviews.pem")), "{stdout}");
    assert!(listener_tls.contains(&p("mesh-ca.pem")), "{stdout}");
    assert!(listener_tls.contains("min TLS 1.3"), "{stdout}");
    assert!(stdout.contains(&format!("allow: [{FRONT}]")), "{stdout}");
    let cluster_tls = line("tls: trusts");
    assert!(
        cluster_tls.contains(&format!("mTLS: presents {}", p("front.pem"))),
        "{stdout}"
    );
    assert!(
        cluster_tls.contains(&format!("expects {REVIEWS}")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_changes_the_certificate_for_new_connections_only() {
    let app = TestUpstream::start("app").await;
    let pki = Pki::new("mesh");
    let (a_cert, a_key) = pki.issue("a", None, &["localhost"]);
    let (b_cert, b_key) = pki.issue("b", None, &["localhost"]);
    let port = free_port();
    let config = |cert: &Path, key: &Path| {
        format!(
            r#"
[proxy]
workers = 1

[[listeners]]
name = "edge"
bind = "127.0.0.1:{port}"
tls = {{ cert = "{cert}", key = "{key}" }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#,
            cert = cert.display(),
            key = key.display(),
            app = app.addr,
        )
    };
    let wasp = Wasp::start(&config(&a_cert, &a_key));
    let client = client_config(&pki.ca_path(), None, H1, BOTH);
    let mut old = tls_connect(addr(port), client.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(old.server_cert, pem_certs(&a_cert)[0].to_vec());

    let text = format!(
        "[admin]\nbind = \"{}\"\n\n{}",
        wasp.admin,
        config(&b_cert, &b_key)
    );
    std::fs::write(wasp.dir.path().join("wasp.toml"), text).unwrap();
    let admin = wasp.admin;
    let answer = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "-X",
                "POST",
                "-H",
                "x-wasp-admin: 1",
                &format!("http://{admin}/reload"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    })
    .await
    .unwrap();
    assert!(answer.contains("generation"), "{answer}");

    let new = tls_connect(addr(port), client, "localhost").await.unwrap();
    assert_eq!(new.server_cert, pem_certs(&b_cert)[0].to_vec());
    // The connection opened before the reload keeps working.
    assert_eq!(old.get("localhost", "/still").await.unwrap().status, 200);
    // The effective config shows the TLS settings (paths, never key bytes).
    let (status, cfg) = wasp.admin_get("/config");
    assert_eq!(status, 200);
    assert!(
        cfg.contains("b-key.pem") && !cfg.contains("PRIVATE KEY"),
        "{cfg}"
    );
}

// ---- source.principal reaches a filter ------------------------------------------------------

/// A Proxy-Wasm guest (WAT) that copies the `source.principal` property into
/// an `x-principal` request header ("none" when the property is absent).
const PRINCIPAL_FILTER: &str = r#"
(module
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (data (i32.const 100) "x-principal")
  (data (i32.const 200) "source\00principal")
  (data (i32.const 300) "none")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $prop (i32.const 200) (i32.const 16) (i32.const 16) (i32.const 20)))
      (then (drop (call $add (i32.const 0) (i32.const 100) (i32.const 11)
        (i32.load (i32.const 16)) (i32.load (i32.const 20)))))
      (else (drop (call $add (i32.const 0) (i32.const 100) (i32.const 11)
        (i32.const 300) (i32.const 4)))))
    (i32.const 0)))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_principal_reaches_filters() {
    let app = TestUpstream::start("app").await;
    let pki = Pki::new("mesh");
    let (cert, key) = pki.issue("reviews", Some(REVIEWS), &["localhost"]);
    let front = pki.issue("front", Some(FRONT), &["front"]);
    let dir = TempDir::new("principal");
    std::fs::create_dir_all(dir.path().join("filters.d")).unwrap();
    std::fs::write(
        dir.path().join("filters.d/principal.wasm"),
        wat::parse_str(PRINCIPAL_FILTER).unwrap(),
    )
    .unwrap();
    let (mtls, plain) = (free_port(), free_port());
    let _wasp = Wasp::start_in(
        dir,
        &format!(
            r#"
[proxy]
workers = 1

[filters.principal]
module = "principal.wasm"

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{mtls}"
pipeline = ["principal"]
tls = {{ cert = "{cert}", key = "{key}", client_ca = "{ca}" }}
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[[listeners]]
name = "plain"
bind = "127.0.0.1:{plain}"
pipeline = ["principal"]
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#,
            cert = cert.display(),
            key = key.display(),
            ca = pki.ca_path().display(),
            app = app.addr,
        ),
        &[],
    );
    let config = client_config(&pki.ca_path(), Some(&front), H2_H1, BOTH);
    let r = tls_get(addr(mtls), config, "localhost", "/who")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains(&format!("x-principal: {FRONT}")),
        "{}",
        r.body
    );
    let r = get(&h1_client(), addr(plain), "app", "/who").await;
    assert!(r.body.contains("x-principal: none"), "{}", r.body);
}
