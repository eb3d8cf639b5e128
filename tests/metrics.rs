//! `/metrics` as Prometheus sees it: a scrape after real traffic (built-in
//! filters loaded, proxy-made errors included) passes `promtool check
//! metrics` without a single lint, carries plausible process metrics and no
//! request path as a label; and a real Prometheus server scraping the admin
//! port answers a query for a wasp counter with the number of requests sent.
//!
//! `promtool` and `prometheus` come from the Debian package `prometheus`
//! (`scripts/test.sh` installs it); these tests fail, not skip, without them.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

/// A tool from the Debian `prometheus` package, or a clear failure.
fn prometheus_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: it comes with the Debian package `prometheus` \
             (apt-get install --no-install-recommends prometheus; scripts/test.sh does this)"
        )
    })
}

/// One listener with the built-in filters: `/ok` goes to `app`, `/dead` to
/// a cluster whose only endpoint refuses connections, anything else matches
/// no route.
fn config(port: u16, app: SocketAddr, dead: SocketAddr) -> String {
    format!(
        r#"
[filters.trace]
module = "trace_context.wasm"
[filters.access_log]
module = "access_log.wasm"
[filters.metrics]
module = "metrics.wasm"

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["trace", "access_log", "metrics"]
  [[listeners.routes]]
  name = "main"
  match = {{ prefix = "/ok" }}
  cluster = "app"
  [[listeners.routes]]
  name = "broken"
  match = {{ prefix = "/dead" }}
  cluster = "dead"

[clusters.app]
endpoints = ["{app}"]
[clusters.dead]
endpoints = ["{dead}"]
connect_timeout = "1s"
"#
    )
}

/// A loopback address nothing listens on.
fn refusing_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn value(text: &str, name: &str) -> f64 {
    metric_value(text, name, &[]).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_after_traffic() {
    let promtool = prometheus_tool("promtool");
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start_in(
        with_builtin_filters(&["trace_context", "access_log", "metrics"]),
        &config(port, app.addr, refusing_addr()),
        &[],
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    // Unique paths: none of them may show up in the exposition.
    for i in 0..20 {
        let r = get(&client, proxy, "app", &format!("/ok/path-marker-{i}")).await;
        assert_eq!(r.status, 200);
    }
    let r = get(&client, proxy, "app", "/nowhere/path-marker-x").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (404, Some("no_route"))
    );
    let r = get(&client, proxy, "app", "/dead/path-marker-y").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (502, Some("upstream_connect"))
    );

    let text = wasp.metrics();
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = check.stdin.take().expect("promtool stdin");
        stdin.write_all(text.as_bytes()).expect("feed promtool");
    }
    let out = check.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {} {report}\nscrape:\n{text}",
        out.status
    );

    // The traffic is in there, under the proxy's and the filter's names.
    let main = [
        "listener=\"inbound\"",
        "route=\"main\"",
        "cluster=\"app\"",
        "code_class=\"2xx\"",
    ];
    assert_eq!(
        metric_value(&text, "wasp_requests_total", &main),
        Some(20.0)
    );
    assert_eq!(
        metric_value(&text, "wasp_http_requests_total", &main),
        Some(20.0)
    );
    assert!(
        text.contains("# TYPE wasp_http_request_duration_seconds histogram"),
        "{text}"
    );
    // The filter sees the status of replies the proxy made itself.
    for (route, class) in [("", "4xx"), ("broken", "5xx")] {
        let labels = [
            "filter=\"metrics\"".to_string(),
            format!("route=\"{route}\""),
            format!("code_class=\"{class}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert_eq!(
            metric_value(&text, "wasp_http_requests_total", &labels),
            Some(1.0),
            "{text}"
        );
    }
    for code in ["no_route", "upstream_connect"] {
        assert_eq!(
            metric_value(
                &text,
                "wasp_proxy_errors_total",
                &[&format!("code=\"{code}\"")]
            ),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(
        metric_value(
            &text,
            "wasp_build_info",
            &[&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // Paths never become labels (nor anything else in the exposition).
    assert!(!text.contains("path-marker"), "{text}");
    // Every sample belongs to a family with HELP and TYPE.
    for sample in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = sample.split(['{', ' ']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let stem = name.strip_suffix(s)?;
                text.contains(&format!("# TYPE {stem} histogram\n"))
                    .then_some(stem)
            })
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# HELP {family} "))
                && text.contains(&format!("# TYPE {family} ")),
            "{name} has no HELP/TYPE:\n{text}"
        );
    }

    // Process metrics, read from /proc/self of the wasp process.
    let rss = value(&text, "process_resident_memory_bytes");
    assert!(rss > 1024.0 * 1024.0, "RSS {rss}");
    assert!(value(&text, "process_virtual_memory_bytes") >= rss);
    let fds = value(&text, "process_open_fds");
    assert!(fds >= 3.0, "open fds {fds}");
    assert!(value(&text, "process_max_fds") >= fds);
    // Compiling three filters and serving requests takes CPU time.
    assert!(value(&text, "process_cpu_seconds_total") > 0.0);
    assert!(value(&text, "process_threads") >= 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = value(&text, "process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "start {start}, now {now}"
    );
    // The counters are the wasp process's own, not this test's.
    let fds_now = value(&wasp.metrics(), "process_open_fds");
    assert!(fds_now >= 3.0);
}

/// A `prometheus` server, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    /// Scrapes `target` every second as job `wasp`.
    fn start(target: SocketAddr) -> Self {
        let binary = prometheus_tool("prometheus");
        let dir = TempDir::new("prometheus");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: wasp\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of the first series an instant query answers, if any.
    async fn query(&self, client: &TestClient, promql: &str) -> Option<f64> {
        let uri = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let req = http::Request::get(uri)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .ok()?
            .ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_port_and_answers_queries() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start_in(
        with_builtin_filters(&["trace_context", "access_log", "metrics"]),
        &config(port, app.addr, refusing_addr()),
        &[],
    );
    let mut prometheus = Prometheus::start(wasp.admin);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let n = 37;
    for i in 0..n {
        let r = get(&client, proxy, "app", &format!("/ok/{i}")).await;
        assert_eq!(r.status, 200);
    }

    let queries = [
        (
            r#"sum(wasp_requests_total{job="wasp",route="main",code_class="2xx"})"#,
            n as f64,
        ),
        (
            r#"sum(wasp_http_requests_total{job="wasp",filter="metrics",route="main",code_class="2xx"})"#,
            n as f64,
        ),
        (
            r#"sum(wasp_http_request_duration_seconds_count{job="wasp",route="main"})"#,
            n as f64,
        ),
        (r#"up{job="wasp"}"#, 1.0),
        (
            r#"count(process_resident_memory_bytes{job="wasp"} > 1048576)"#,
            1.0,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Vec::new();
    loop {
        if let Ok(Some(status)) = prometheus.child.try_wait() {
            panic!(
                "prometheus exited with {status}; log:\n{}",
                prometheus.log()
            );
        }
        last.clear();
        for (q, _) in &queries {
            last.push(prometheus.query(&client, q).await);
        }
        let all = queries
            .iter()
            .zip(&last)
            .all(|((_, want), got)| *got == Some(*want));
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never answered as expected: {:?}\nprometheus log:\n{}",
            queries
                .iter()
                .map(|(q, w)| q.to_string() + " want " + &w.to_string())
                .zip(&last)
                .collect::<Vec<_>>(),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Prometheus parsed every scrape without complaint.
    let log = prometheus.log();
    assert!(
        !log.contains("Error on ingesting") && !log.contains("append failed"),
        "prometheus log:\n{log}"
    );
}
