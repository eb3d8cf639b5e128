//! A hostile filter against the real binary: each test loads the `abuse`
//! fixture (tests/wasm/abuse), makes one request that asks the host for too
//! much, and checks that the process is alive, that the abusing request was
//! failed by the filter's policy (or the guest got a status and the host
//! kept nothing past the limit), and that the next clean request is served
//! through the filter (the upstream sees the filter's `x-abuse-filter`).

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

/// One worker, one listener through the `abuse` filter to `app`, plus the
/// cluster `target` (for callouts) with outlier detection that ejects its
/// only endpoint after 5 consecutive failures.
fn config(port: u16, app: SocketAddr, filter_limits: &str, target_extra: &str) -> String {
    format!(
        r#"
[proxy]
workers = 1

[filters.abuse]
module = "abuse.wasm"
limits = {{ cpu = "5s"{filter_limits} }}

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["abuse"]
  [[listeners.routes]]
  name = "target"
  match = {{ prefix = "/target" }}
  cluster = "target"
  [[listeners.routes]]
  name = "app"
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]

[clusters.target]
endpoints = ["{app}"]
outlier = {{ consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 100 }}
{target_extra}
"#
    )
}

struct Setup {
    wasp: Wasp,
    proxy: SocketAddr,
    client: TestClient,
    _app: TestUpstream,
}

async fn start(filter_limits: &str) -> Setup {
    start_with(filter_limits, "").await
}

async fn start_with(filter_limits: &str, target_extra: &str) -> Setup {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start_in(
        with_fixtures("wasm32-wasip1", &["abuse"]),
        &config(port, app.addr, filter_limits, target_extra),
        &[],
    );
    Setup {
        wasp,
        proxy: loopback(port),
        client: h1_client(),
        _app: app,
    }
}

impl Setup {
    async fn abuse(&self, mode: &str, extra: &[(&str, &str)]) -> Answer {
        let mut req = http::Request::get(format!("http://{}/", self.proxy))
            .header("host", "app")
            .header("x-abuse", mode);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        send(&self.client, req.body(Full::new(Bytes::new())).unwrap()).await
    }

    /// The process is alive and a clean request runs through the filter.
    async fn clean_request_served(&mut self) {
        assert!(
            self.wasp.child.try_wait().unwrap().is_none(),
            "wasp exited; log:\n{}",
            self.wasp.log_text()
        );
        let r = get(&self.client, self.proxy, "app", "/clean").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.contains("x-abuse-filter: seen"),
            "the clean request did not run through the filter: {r:?}"
        );
    }

    fn limit_count(&self, limit: &str) -> f64 {
        let label = format!("limit=\"{limit}\"");
        metric_value(
            &self.wasp.metrics(),
            "wasp_filter_limit_exceeded_total",
            &["filter=\"abuse\"", &label],
        )
        .unwrap_or(0.0)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.wasp.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_header_adds_fail_only_that_request() {
    let mut s = start("").await;
    // Added one by one, set as a whole map, or in a local response.
    for mode in ["headers", "set-headers", "local-headers"] {
        let r = s.abuse(mode, &[]).await;
        assert_eq!(
            (r.status, r.header("x-wasp-error")),
            (503, Some("filter_failed")),
            "{mode}: {r:?}"
        );
        // limits.headers, or limits.header_bytes when the map's size gives it away first.
        assert!(r.body.contains("over limits.header"), "{mode}: {r:?}");
        s.clean_request_served().await;
    }
    assert!(s.limit_count("headers") + s.limit_count("header_bytes") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4mib_fd_write_and_many_iovecs_are_bounded() {
    let mut s = start("").await;
    let r = s.abuse("fd-write", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Everything is reported written (dropped past the log budget), so a
    // guest never loops retrying; 100,000 iovecs are a short write of
    // the first 1024 (2 bytes each).
    assert_eq!(r.header("x-big-written"), Some("4194304"), "{r:?}");
    assert_eq!(r.header("x-many-written"), Some("2048"), "{r:?}");
    s.clean_request_served().await;
    assert!(s.limit_count("log_bytes") >= 1.0);
    let log = s.wasp.log_text();
    assert!(
        log.len() < 1 << 20,
        "the log took {} bytes of filter output",
        log.len()
    );
}

/// Reads one HTTP/1.1 response (head plus a `content-length` body) from
/// `buf` at `at`; returns (head, body, next offset).
fn parse_response(buf: &[u8], at: usize) -> Option<(String, Vec<u8>, usize)> {
    let rest = buf.get(at..)?;
    let end = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&rest[..end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let body_at = end + 4;
    let body = rest.get(body_at..body_at + len)?.to_vec();
    Some((head, body, at + body_at + len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_local_content_length_cannot_desync_the_connection() {
    let mut s = start("").await;
    let proxy = s.proxy;
    let bytes = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(proxy).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: app\r\nx-abuse: local-lie\r\n\r\n\
              GET /clean HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    })
    .await
    .unwrap();
    let mut responses = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some((head, body, next)) = parse_response(&bytes, at) else {
            panic!(
                "unparseable bytes after {} responses: {:?}",
                responses.len(),
                String::from_utf8_lossy(&bytes[at..])
            );
        };
        responses.push((head, body));
        at = next;
    }
    assert_eq!(
        responses.len(),
        2,
        "exactly two responses: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let (head, body) = &responses[0];
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        body.as_slice(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
    );
    let (head, body) = &responses[1];
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        String::from_utf8_lossy(body).contains("x-abuse-filter: seen"),
        "{head}"
    );
    s.clean_request_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_past_its_limit_is_refused_and_rss_stays_bounded() {
    let mut s = start("").await;
    // Warm up (VM, pools), then measure.
    let r = s.abuse("shared-data", &[("x-n", "warm")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let before = s.rss_kib();
    for n in 0..10 {
        let r = s.abuse("shared-data", &[("x-n", &n.to_string())]).await;
        assert_eq!(r.status, 200, "{r:?}");
        // 8 MiB values are each past the default 4 MiB: CAS_MISMATCH.
        assert_eq!(r.header("x-refused"), Some("8"), "{r:?}");
    }
    let after = s.rss_kib();
    // Stored, 10 x 8 x 8 MiB would be 640 MiB.
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert!(s.limit_count("shared_data") >= 80.0);
    s.clean_request_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_metrics_and_reserved_names_keep_the_scrape_valid() {
    let mut s = start("").await;
    let r = s.abuse("wasp-metric", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.abuse("metrics", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    s.clean_request_served().await;
    let text = s.wasp.metrics();
    let families = text
        .lines()
        .filter(|l| l.starts_with("# TYPE abuse_m"))
        .count();
    // limits.metrics defaults to 1000, one of them `abuse_labelled_total`.
    assert_eq!(families, 999);
    assert!(s.limit_count("metrics") >= 19_000.0);
    assert!(s.limit_count("metric_name") >= 1.0);
    assert!(
        text.contains("abuse_labelled_total{filter=\"abuse\",exported_filter=\"evil\"} 1"),
        "a guest `filter` label is exported as `exported_filter`"
    );
    assert_eq!(
        text.matches("# TYPE wasp_requests_total ").count(),
        1,
        "only wasp's own wasp_requests_total"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package `prometheus`; scripts/test.sh installs it)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {} {report}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_with_a_1ms_timeout_eject_no_endpoint() {
    let mut s = start(", callouts = 1000").await;
    let r = s.abuse("callouts", &[("x-cluster", "target")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-dispatched"), Some("500"), "{r:?}");
    // Let every callout time out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = get(&s.client, s.proxy, "app", "/target/after").await;
    assert_eq!(r.status, 200, "the endpoint was ejected: {r:?}");
    let ejections = metric_value(
        &s.wasp.metrics(),
        "wasp_cluster_ejections_total",
        &["cluster=\"target\""],
    )
    .unwrap_or(0.0);
    assert_eq!(ejections, 0.0);
    s.clean_request_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_past_the_in_flight_limit_get_a_status() {
    let mut s = start(", callouts = 10").await;
    let r = s.abuse("callouts", &[("x-cluster", "target")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.header("x-dispatched"), r.header("x-refused")),
        (Some("10"), Some("490")),
        "{r:?}"
    );
    assert!(s.limit_count("callouts") >= 490.0);
    s.clean_request_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_are_admitted_under_the_cluster_circuit_breakers() {
    let mut s = start_with(", callouts = 1000", "limits = { max_requests = 5 }").await;
    let r = s.abuse("callouts", &[("x-cluster", "target")]).await;
    assert_eq!(r.header("x-dispatched"), Some("500"), "{r:?}");
    // All 500 start before the first 1 ms timeout: at most 5 are admitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let overflows = metric_value(
        &s.wasp.metrics(),
        "wasp_cluster_overflows_total",
        &["cluster=\"target\""],
    )
    .unwrap_or(0.0);
    assert!(overflows >= 400.0, "overflows: {overflows}");
    // Once they are gone the cluster admits again.
    let r = get(&s.client, s.proxy, "app", "/target/after").await;
    assert_eq!(r.status, 200, "{r:?}");
    s.clean_request_served().await;
}

/// The header caps bound what a filter adds, not what arrived: a client
/// request with more headers than `limits.headers` (say, at hyper's
/// 100-header limit with the default cap), plus the core's `x-request-id`,
/// still leaves the filter room to add its header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_client_header_map_still_leaves_the_filter_its_allowance() {
    let mut s = start(", headers = 20").await;
    let mut req = http::Request::get(format!("http://{}/full", s.proxy)).header("host", "app");
    for i in 0..30 {
        req = req.header(format!("x-client-{i}"), "v");
    }
    let r = send(&s.client, req.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("x-abuse-filter: seen"), "{r:?}");
    assert!(r.body.contains("x-client-29: v"), "{r:?}");
    assert_eq!(s.limit_count("headers"), 0.0);
    s.clean_request_served().await;
}
