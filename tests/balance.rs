//! Balancing, health and resilience through the real binary, with real
//! upstream servers on loopback: peak-EWMA against a slow endpoint (and
//! round robin as the control), recovery of the slow endpoint, killing an
//! endpoint under load, ejection of an endpoint answering 503, the retry
//! budget when everything fails, consistent hashing, and DNS and file
//! discovery following changes.
//!
//! Every test prints what it measured (run with `--nocapture` to see it).

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

// === a controllable upstream ===

/// An upstream whose delay and status can be changed, and which can be
/// killed (listener and every open connection closed) and restarted on the
/// same address.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    healthy: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Server {
    async fn start(name: &'static str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(name: &'static str, addr: SocketAddr) -> Self {
        let mut s = Server {
            name,
            addr,
            requests: Arc::new(AtomicUsize::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            status: Arc::new(AtomicU16::new(200)),
            healthy: Arc::new(AtomicBool::new(true)),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        s.listen().await;
        s
    }

    async fn listen(&mut self) {
        let mut listener = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let listener = listener.expect("bind test server");
        self.addr = listener.local_addr().unwrap();
        let (name, requests, delay, status, healthy, tasks) = (
            self.name,
            self.requests.clone(),
            self.delay_ms.clone(),
            self.status.clone(),
            self.healthy.clone(),
            self.tasks.clone(),
        );
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (requests, delay, status, healthy) = (
                    requests.clone(),
                    delay.clone(),
                    status.clone(),
                    healthy.clone(),
                );
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (requests, delay, status, healthy) = (
                            requests.clone(),
                            delay.clone(),
                            status.clone(),
                            healthy.clone(),
                        );
                        async move {
                            let is_health = req.uri().path() == "/healthz";
                            let got = req
                                .into_body()
                                .collect()
                                .await
                                .map_or(0, |b| b.to_bytes().len());
                            let code = if is_health {
                                if healthy.load(Ordering::SeqCst) {
                                    200
                                } else {
                                    503
                                }
                            } else {
                                requests.fetch_add(1, Ordering::SeqCst);
                                let ms = delay.load(Ordering::SeqCst);
                                if ms > 0 {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                status.load(Ordering::SeqCst)
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::from(name)));
                            *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            resp.headers_mut()
                                .insert("x-upstream", name.parse().unwrap());
                            resp.headers_mut().insert("x-body-bytes", got.into());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Closes the listener and every connection, as a crashed process would.
    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    async fn restart(&mut self) {
        self.listen().await;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// === client helpers ===

/// GET through the proxy; `Err` for transport errors, else (status, upstream).
async fn try_get(
    client: &TestClient,
    proxy: SocketAddr,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req = http::Request::get(format!("http://{proxy}/work")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let upstream = resp
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let _ = resp.into_body().collect().await;
    Ok((status, upstream))
}

/// Sends `n` requests from `concurrency` clients; counts answers by upstream.
async fn load(
    proxy: SocketAddr,
    host: &'static str,
    n: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut seen = BTreeMap::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let (status, up) = try_get(&client, proxy, host, &[]).await.expect("request");
                assert_eq!(status, 200, "from {up}");
                *seen.entry(up).or_insert(0usize) += 1;
            }
            seen
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_insert(0) += v;
        }
    }
    all
}

fn share(dist: &BTreeMap<String, usize>, name: &str) -> f64 {
    let total: usize = dist.values().sum();
    dist.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

fn clusters(wasp: &Wasp) -> serde_json::Value {
    serde_json::from_str(&wasp.admin_get("/clusters").1).expect("clusters json")
}

fn endpoint<'a>(
    c: &'a serde_json::Value,
    cluster: &str,
    addr: SocketAddr,
) -> &'a serde_json::Value {
    c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == cluster)
        .and_then(|x| {
            x["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == addr.to_string())
        })
        .unwrap_or(&serde_json::Value::Null)
}

/// wasp (2 workers) whose outbound listener on `port` sends host `svc` to
/// the cluster `svc`, configured by `cluster` (the body of its table).
fn svc_sidecar(port: u16, cluster: &str) -> Wasp {
    svc_sidecar_with(port, 2, "", cluster)
}

/// [`svc_sidecar`] with `workers` and `route` (lines added to the route).
fn svc_sidecar_with(port: u16, workers: usize, route: &str, cluster: &str) -> Wasp {
    Wasp::start(&format!(
        r#"
[proxy]
workers = {workers}

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "svc" }}
  cluster = "svc"
{route}
[clusters.svc]
{cluster}"#
    ))
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peak_ewma_avoids_a_slow_endpoint_round_robin_does_not() {
    let fast1 = Server::start("fast1").await;
    let fast2 = Server::start("fast2").await;
    let slow = Server::start("slow").await;
    slow.delay_ms.store(50, Ordering::SeqCst);
    let port = free_port();
    let eps = format!(
        "[\"{}\", \"{}\", \"{}\"]",
        fast1.addr, fast2.addr, slow.addr
    );
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "ewma" }}
  cluster = "ewma"
  [[listeners.routes]]
  match = {{ host = "rr" }}
  cluster = "rr"

[clusters.ewma]
endpoints = {eps}
decay = "500ms"

[clusters.rr]
endpoints = {eps}
balance = "round_robin"
"#
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Warm-up, then measure.
    load(proxy, "ewma", 100, 8).await;
    let ewma = load(proxy, "ewma", 1000, 8).await;
    let rr = load(proxy, "rr", 300, 8).await;
    println!(
        "peak_ewma with one endpoint 50 ms slower: {ewma:?} (slow share {:.1}%)",
        share(&ewma, "slow") * 100.0
    );
    println!(
        "round_robin, same endpoints:              {rr:?} (slow share {:.1}%)",
        share(&rr, "slow") * 100.0
    );
    assert!(
        share(&ewma, "slow") < 0.10,
        "peak_ewma sent too much to the slow endpoint: {ewma:?}"
    );
    let rr_slow = share(&rr, "slow");
    assert!(
        (0.28..0.39).contains(&rr_slow),
        "round robin should send a third: {rr:?}"
    );

    let c = clusters(&wasp);
    let est = endpoint(&c, "ewma", slow.addr)["latency_estimate_ms"]
        .as_f64()
        .unwrap_or(0.0);
    println!("/clusters latency estimate of the slow endpoint: {est:.1} ms");

    // The slow endpoint recovers: it earns traffic back within a few decay
    // constants (the estimate decays toward zero while it is left alone).
    slow.delay_ms.store(0, Ordering::SeqCst);
    let recovered = Instant::now();
    let mut back_after = None;
    while recovered.elapsed() < Duration::from_secs(8) {
        let window = load(proxy, "ewma", 300, 8).await;
        if share(&window, "slow") > 0.15 {
            back_after = Some(recovered.elapsed());
            println!(
                "after recovery: {window:?} (slow share {:.1}%)",
                share(&window, "slow") * 100.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back_after = back_after.expect("the recovered endpoint never got its share back");
    println!("the recovered endpoint got traffic again after {back_after:?} (decay = 500ms)");
    assert!(back_after < Duration::from_secs(5), "{back_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_endpoint_under_load_is_invisible_to_gets() {
    let a = Server::start("a").await;
    let mut b = Server::start("b").await;
    let c = Server::start("c").await;
    let port = free_port();
    let wasp = svc_sidecar_with(
        port,
        2,
        r#"  retry = { on = ["connect-failure", "reset", "5xx"], attempts = 2, per_try_timeout = "500ms" }"#,
        &format!(
            r#"endpoints = ["{}", "{}", "{}"]
connect_timeout = "200ms"
health = {{ path = "/healthz", interval = "200ms", timeout = "150ms", unhealthy = 2, healthy = 1 }}
outlier = {{ consecutive_failures = 3, base_ejection = "1s", max_ejection_percent = 50 }}
"#,
            a.addr, b.addr, c.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (stop, errors, sent) = (stop.clone(), errors.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::SeqCst) {
                sent.fetch_add(1, Ordering::SeqCst);
                match try_get(&client, proxy, "svc", &[]).await {
                    Ok((200, _)) => {}
                    Ok((s, up)) => errors.lock().unwrap().push(format!("{s} from {up}")),
                    Err(e) => errors.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = b.requests();
    b.kill();
    let killed = Instant::now();
    // It is marked unhealthy (health checks) or ejected (failures).
    let mut out_after = None;
    while killed.elapsed() < Duration::from_secs(3) {
        let e = clusters(&wasp);
        let ep = endpoint(&e, "svc", b.addr);
        if ep["health"] != "healthy" {
            out_after = Some((killed.elapsed(), ep["health"].clone()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (out_after, state) = out_after.expect("the killed endpoint was never taken out");
    println!("killed endpoint taken out after {out_after:?} as {state}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent_while_down = sent.load(Ordering::SeqCst);

    b.restart().await;
    let restarted = Instant::now();
    let at_restart = b.requests();
    let mut back_after = None;
    while restarted.elapsed() < Duration::from_secs(5) {
        if b.requests() > at_restart + 5 {
            back_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in clients {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let m = wasp.metrics();
    let retries =
        metric_value(&m, "wasp_cluster_retries_total", &["cluster=\"svc\""]).unwrap_or(0.0);
    println!(
        "requests: {} sent ({} by the time b came back), a={} b={} (before kill {}) c={}, retries={retries}, client errors={}",
        sent.load(Ordering::SeqCst),
        sent_while_down,
        a.requests(),
        b.requests(),
        before,
        c.requests(),
        errors.len()
    );
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    let back_after = back_after.expect("the restarted endpoint never got traffic again");
    println!("restarted endpoint back in rotation after {back_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_is_ejected_after_the_threshold() {
    let a = Server::start("a").await;
    let bad = Server::start("bad").await;
    let c = Server::start("c").await;
    bad.status.store(503, Ordering::SeqCst);
    let port = free_port();
    let wasp = svc_sidecar_with(
        port,
        1,
        "",
        &format!(
            r#"endpoints = ["{}", "{}", "{}"]
balance = "round_robin"
outlier = {{ consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 50 }}
"#,
            a.addr, bad.addr, c.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let mut statuses = BTreeMap::new();
    for _ in 0..60 {
        let (s, _) = try_get(&client, proxy, "svc", &[]).await.unwrap();
        *statuses.entry(s).or_insert(0) += 1;
    }
    let cl = clusters(&wasp);
    let ep = endpoint(&cl, "svc", bad.addr);
    println!(
        "statuses {statuses:?}; the 503 endpoint served {} requests; /clusters says {}",
        bad.requests(),
        ep
    );
    assert_eq!(bad.requests(), 5, "ejected right at the threshold");
    assert_eq!(ep["health"], "ejected");
    assert_eq!(ep["ejections"], 1);
    assert_eq!(statuses.get(&503), Some(&5));
    let m = wasp.metrics();
    assert_eq!(
        metric_value(&m, "wasp_cluster_ejections_total", &["cluster=\"svc\""]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_retry_budget_caps_extra_load_when_every_endpoint_fails() {
    let servers = [
        Server::start("a").await,
        Server::start("b").await,
        Server::start("c").await,
    ];
    for s in &servers {
        s.status.store(503, Ordering::SeqCst);
    }
    let port = free_port();
    let cluster = |name: &str, budget: &str| {
        format!(
            "[clusters.{name}]\nendpoints = [\"{}\", \"{}\", \"{}\"]\n{budget}\n",
            servers[0].addr, servers[1].addr, servers[2].addr
        )
    };
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "budget" }}
  cluster = "budget"
  retry = {{ on = ["5xx"], attempts = 2, backoff = "1ms" }}
  [[listeners.routes]]
  match = {{ host = "unbounded" }}
  cluster = "unbounded"
  retry = {{ on = ["5xx"], attempts = 2, backoff = "1ms" }}

{}
{}
"#,
        cluster(
            "budget",
            "retry_budget = { ratio = 0.2, min_per_second = 5 }"
        ),
        cluster("unbounded", "")
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let total = || servers.iter().map(Server::requests).sum::<usize>();

    let run = |host: &'static str| async move {
        let n = 400;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..4 {
            tasks.push(tokio::spawn(async move {
                let client = h1_client();
                let mut count = 0;
                for _ in (i..n).step_by(4) {
                    let (s, _) = try_get(&client, proxy, host, &[]).await.unwrap();
                    assert_eq!(s, 503);
                    count += 1;
                }
                count
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await.unwrap();
        }
        (sent, start.elapsed())
    };
    let before = total();
    let (sent, took) = run("unbounded").await;
    let unbounded = (total() - before) as f64 / sent as f64;
    let before = total();
    let (sent, took_b) = run("budget").await;
    let budgeted = (total() - before) as f64 / sent as f64;
    let m = wasp.metrics();
    let exhausted = metric_value(
        &m,
        "wasp_cluster_retry_budget_exhausted_total",
        &["cluster=\"budget\""],
    )
    .unwrap_or(0.0);
    println!("every endpoint 503, attempts = 2: upstream requests / client requests = {unbounded:.2} without a budget ({took:?}), {budgeted:.2} with ratio 0.2 + 5/s ({took_b:?}); {exhausted} retries refused by the budget");
    assert!(unbounded > 2.9, "{unbounded}");
    // The budget counts per one-second window: each window the run touches
    // grants its own minimum; the reset at a window edge may let a couple
    // more through (the counters are not reset atomically together).
    let windows = took_b.as_secs_f64().ceil() + 1.0;
    let bound = 1.0 + 0.2 + (5.0 * windows + 4.0) / sent as f64;
    assert!(budgeted <= bound, "{budgeted} > {bound}");
    assert!(exhausted > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_keep_a_key_on_one_endpoint() {
    let servers = [
        Server::start("a").await,
        Server::start("b").await,
        Server::start("c").await,
    ];
    let port = free_port();
    let eps = format!(
        "[\"{}\", \"{}\", \"{}\"]",
        servers[0].addr, servers[1].addr, servers[2].addr
    );
    let _wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "ring" }}
  cluster = "ring"
  [[listeners.routes]]
  match = {{ host = "maglev" }}
  cluster = "maglev"

[clusters.ring]
endpoints = {eps}
balance = "ring_hash"
hash_key = {{ header = "x-user" }}

[clusters.maglev]
endpoints = {eps}
balance = "maglev"
hash_key = {{ cookie = "session" }}
"#
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for (host, header, fmt) in [
        ("ring", "x-user", "{}"),
        ("maglev", "cookie", "a=1; session={}"),
    ] {
        let mut used = BTreeMap::new();
        for u in 0..30 {
            let value = fmt.replace("{}", &format!("user-{u}"));
            let mut seen = Vec::new();
            for _ in 0..4 {
                // A fresh connection each time, so both workers answer.
                let client = h1_client();
                let (s, up) = try_get(&client, proxy, host, &[(header, &value)])
                    .await
                    .unwrap();
                assert_eq!(s, 200);
                seen.push(up);
            }
            seen.dedup();
            assert_eq!(seen.len(), 1, "{host}: key {value} moved: {seen:?}");
            *used.entry(seen[0].clone()).or_insert(0) += 1;
        }
        println!("{host}: 30 keys spread as {used:?}");
        assert!(used.len() >= 2, "{used:?}");
    }
}

// === discovery ===

/// A DNS server on UDP loopback answering from a table of records the test
/// changes (A and SRV), with a 1 s TTL.
struct Dns {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<(String, hickory_proto::rr::RData)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn a_record(ip: Ipv4Addr) -> hickory_proto::rr::RData {
    hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(ip))
}

fn srv_record(port: u16, target: &str) -> hickory_proto::rr::RData {
    let target = hickory_proto::rr::Name::from_ascii(target).unwrap();
    hickory_proto::rr::RData::SRV(hickory_proto::rr::rdata::SRV::new(0, 1, port, target))
}

impl Dns {
    async fn start() -> Self {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::Record;
        use hickory_proto::serialize::binary::BinEncodable;

        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let records = Arc::new(Mutex::new(Vec::new()));
        let table = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::new();
                resp.set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                resp.add_queries(query.queries().to_vec());
                let mut known = false;
                for q in query.queries() {
                    let name = q.name().to_lowercase().to_ascii();
                    let table: Vec<(String, hickory_proto::rr::RData)> =
                        table.lock().unwrap().clone();
                    for (owner, data) in table {
                        if owner == name {
                            known = true;
                            if data.record_type() == q.query_type() {
                                resp.add_answer(Record::from_rdata(q.name().clone(), 1, data));
                            }
                        }
                    }
                }
                if !known {
                    resp.set_response_code(ResponseCode::NXDomain);
                }
                if let Ok(bytes) = resp.to_bytes() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Dns {
            addr,
            records,
            task,
        }
    }

    /// Replaces every record of `name` (a fully qualified, lower-case name).
    fn set(&self, name: &str, data: Vec<hickory_proto::rr::RData>) {
        let mut t = self.records.lock().unwrap();
        t.retain(|(n, _)| n != name);
        t.extend(data.into_iter().map(|d| (name.to_string(), d)));
    }
}

/// Waits until every request in a burst goes to `want`; returns how long it took.
async fn until_all_go_to(
    proxy: SocketAddr,
    host: &'static str,
    want: &str,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let client = h1_client();
    while start.elapsed() < limit {
        let mut all = true;
        for _ in 0..10 {
            match try_get(&client, proxy, host, &[]).await {
                Ok((200, up)) if up == want => {}
                _ => all = false,
            }
        }
        if all {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_record_changes() {
    // Two servers on the same port at two loopback addresses.
    let mut one = None;
    let mut two = None;
    for _ in 0..20 {
        let a = Server::start_at("one", "127.0.0.2:0".parse().unwrap()).await;
        let port = a.addr.port();
        let b_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), port);
        if std::net::TcpListener::bind(b_addr).is_ok() {
            two = Some(Server::start_at("two", b_addr).await);
            one = Some(a);
            break;
        }
    }
    let (one, two) = (one.expect("server one"), two.expect("server two"));
    let dns = Dns::start().await;
    dns.set(
        "svc.wasp.test.",
        vec![a_record(Ipv4Addr::new(127, 0, 0, 2))],
    );
    let port = free_port();
    let wasp = svc_sidecar(
        port,
        &format!(
            r#"discovery = {{ dns = "svc.wasp.test.", port = {}, refresh = "1s", min_refresh = "100ms", max_refresh = "1s", nameserver = "{}" }}
"#,
            one.addr.port(),
            dns.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The very first request waits for the first DNS answer rather than
    // failing with no_endpoint.
    let (status, up) = try_get(&h1_client(), proxy, "svc", &[]).await.unwrap();
    assert_eq!((status, up.as_str()), (200, "one"));
    let first = until_all_go_to(proxy, "svc", "one", Duration::from_secs(5)).await;
    println!("DNS: first answer used after {first:?}");
    assert!(first.is_some(), "log:\n{}", wasp.log_text());

    dns.set(
        "svc.wasp.test.",
        vec![a_record(Ipv4Addr::new(127, 0, 0, 3))],
    );
    let moved = until_all_go_to(proxy, "svc", "two", Duration::from_secs(5)).await;
    println!("DNS: record changed to 127.0.0.3, traffic followed after {moved:?} (TTL 1s, max_refresh 1s)");
    let moved = moved.expect("traffic never followed the DNS change");
    assert!(moved < Duration::from_millis(2500), "{moved:?}");

    dns.set(
        "svc.wasp.test.",
        vec![
            a_record(Ipv4Addr::new(127, 0, 0, 2)),
            a_record(Ipv4Addr::new(127, 0, 0, 3)),
        ],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = clusters(&wasp);
    let n = c["clusters"][0]["endpoints"]
        .as_array()
        .map_or(0, |e| e.len());
    println!("DNS: two records -> /clusters lists {n} endpoints");
    assert_eq!(n, 2, "{c}");
    drop((one, two));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_discovery_follows_record_changes() {
    // SRV records carry the ports, so the two servers need not share one.
    let one = Server::start("one").await;
    let two = Server::start("two").await;
    let dns = Dns::start().await;
    dns.set("one.wasp.test.", vec![a_record(Ipv4Addr::LOCALHOST)]);
    dns.set("two.wasp.test.", vec![a_record(Ipv4Addr::LOCALHOST)]);
    dns.set(
        "_http._tcp.svc.wasp.test.",
        vec![srv_record(one.addr.port(), "one.wasp.test.")],
    );
    let port = free_port();
    let wasp = svc_sidecar(
        port,
        &format!(
            r#"discovery = {{ srv = "_http._tcp.svc.wasp.test.", refresh = "1s", min_refresh = "100ms", max_refresh = "1s", nameserver = "{}" }}
"#,
            dns.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let first = until_all_go_to(proxy, "svc", "one", Duration::from_secs(5)).await;
    println!("SRV: first answer used after {first:?}");
    assert!(first.is_some(), "log:\n{}", wasp.log_text());

    dns.set(
        "_http._tcp.svc.wasp.test.",
        vec![srv_record(two.addr.port(), "two.wasp.test.")],
    );
    let moved = until_all_go_to(proxy, "svc", "two", Duration::from_secs(5)).await;
    println!("SRV: record changed to another port, traffic followed after {moved:?}");
    let moved = moved.expect("traffic never followed the SRV change");
    assert!(moved < Duration::from_millis(2500), "{moved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_discovery_follows_the_endpoints_file() {
    let one = Server::start("one").await;
    let two = Server::start("two").await;
    let port = free_port();
    let dir = TempDir::new("eps");
    let file = dir.path().join("endpoints.toml");
    std::fs::write(&file, format!("endpoints = [\"{}\"]\n", one.addr)).unwrap();
    let wasp = svc_sidecar(
        port,
        &format!(
            r#"discovery = {{ file = "{}" }}
"#,
            file.display()
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(until_all_go_to(proxy, "svc", "one", Duration::from_secs(3))
        .await
        .is_some());

    // Replace the file atomically, as an agent would.
    let tmp = dir.path().join("endpoints.toml.tmp");
    std::fs::write(
        &tmp,
        format!(
            "endpoints = [{{ address = \"{}\", weight = 2 }}]\n",
            two.addr
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let moved = until_all_go_to(proxy, "svc", "two", Duration::from_secs(5)).await;
    println!("file: endpoints file rewritten, traffic followed after {moved:?}");
    let moved = moved.expect("traffic never followed the file");
    assert!(moved < Duration::from_millis(1500), "{moved:?}");

    // A broken file changes nothing.
    std::fs::write(&file, "endpoints = [\"not an address\"]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(until_all_go_to(proxy, "svc", "two", Duration::from_secs(1))
        .await
        .is_some());
    let c = clusters(&wasp);
    println!(
        "file: broken file kept the last set; discovery_error = {}",
        c["clusters"][0]["discovery_error"]
    );
    assert!(c["clusters"][0]["discovery_error"].is_string(), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_take_an_endpoint_out_and_back() {
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let sick = Server::start("sick").await;
    let port = free_port();
    let wasp = svc_sidecar(
        port,
        &format!(
            r#"endpoints = ["{}", "{}", "{}"]
balance = "round_robin"
health = {{ path = "/healthz", interval = "100ms", timeout = "100ms", unhealthy = 2, healthy = 2 }}
"#,
            a.addr, b.addr, sick.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let before = load(proxy, "svc", 60, 2).await;
    assert!(share(&before, "sick") > 0.25, "{before:?}");

    // Health checks fail (the endpoint still answers requests): out.
    sick.healthy.store(false, Ordering::SeqCst);
    let marked = Instant::now();
    while endpoint(&clusters(&wasp), "svc", sick.addr)["health"] != "unhealthy" {
        assert!(
            marked.elapsed() < Duration::from_secs(3),
            "never marked unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = marked.elapsed();
    let during = load(proxy, "svc", 60, 2).await;
    println!("health: unhealthy after {took:?}; traffic while unhealthy {during:?}");
    assert_eq!(during.get("sick"), None, "{during:?}");

    // Passing again: back in rotation.
    sick.healthy.store(true, Ordering::SeqCst);
    let back = Instant::now();
    while endpoint(&clusters(&wasp), "svc", sick.addr)["health"] != "healthy" {
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = load(proxy, "svc", 60, 2).await;
    println!(
        "health: healthy again after {:?}; traffic {after:?}",
        back.elapsed()
    );
    assert!(share(&after, "sick") > 0.25, "{after:?}");
    let m = wasp.metrics();
    let label = format!("endpoint=\"{}\"", sick.addr);
    assert_eq!(
        metric_value(&m, "wasp_endpoint_healthy", &[&label]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn circuit_breaker_answers_overflow() {
    let slow = Server::start("slow").await;
    slow.delay_ms.store(300, Ordering::SeqCst);
    let port = free_port();
    let wasp = svc_sidecar_with(
        port,
        1,
        "",
        &format!(
            "endpoints = [\"{}\"]\nlimits = {{ max_requests = 2 }}\n",
            slow.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let req = http::Request::get(format!("http://{proxy}/"))
                .header("host", "svc")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let code = resp
                .headers()
                .get("x-wasp-error")
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), code)
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers.sort();
    println!("five concurrent requests, max_requests = 2: {answers:?}");
    assert_eq!(
        answers.iter().filter(|a| a.0 == 200).count(),
        2,
        "{answers:?}"
    );
    assert!(answers
        .iter()
        .filter(|a| a.0 != 200)
        .all(|a| a == &(503, Some("overflow".to_string()))));
    let m = wasp.metrics();
    assert_eq!(
        metric_value(&m, "wasp_cluster_overflows_total", &["cluster=\"svc\""]),
        Some(3.0)
    );
    assert_eq!(slow.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_kept_for_retries() {
    let good = Server::start("good").await;
    let bad = Server::start("bad").await;
    bad.status.store(503, Ordering::SeqCst);
    // Nothing listens here: connections are refused.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let _wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "refused" }}
  cluster = "refused"
  retry = {{ on = ["connect-failure", "5xx"], attempts = 1, backoff = "1ms" }}
  [[listeners.routes]]
  match = {{ host = "failing" }}
  cluster = "failing"
  retry = {{ on = ["connect-failure", "5xx"], attempts = 1, backoff = "1ms" }}

[clusters.refused]
endpoints = ["{dead}", "{}"]
balance = "round_robin"

[clusters.failing]
endpoints = ["{}", "{}"]
balance = "round_robin"
"#,
        good.addr, bad.addr, good.addr
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let send = |host: &'static str, method: &'static str| {
        let client = client.clone();
        async move {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{proxy}/upload"))
                .header("host", host)
                .body(Full::new(Bytes::from_static(b"0123456789abcdef")))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp
                .headers()
                .get("x-body-bytes")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            (status, bytes)
        }
    };
    // POST: retried where the request never left (connection refused).
    for _ in 0..6 {
        assert_eq!(send("refused", "POST").await, (200, "16".to_string()));
    }
    // PUT is idempotent: a 503 is retried elsewhere, body and all.
    for _ in 0..6 {
        assert_eq!(send("failing", "PUT").await, (200, "16".to_string()));
    }
    // POST is not: a 503 is the answer.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(send("failing", "POST").await.0);
    }
    println!("kept bodies: POST over refused connections and PUT over 503s all answered 200 with 16 bytes; POST over 503s: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        3,
        "{statuses:?}"
    );
}

/// `limits.max_connections` is a hard cap even on a cold pool: every
/// request of a burst checks the limit before any connection has finished
/// opening, so only a slot reserved before dialling keeps the burst from
/// opening one connection per request. Two workers, so the cap is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_holds_for_a_burst_on_a_cold_pool() {
    const BURST: usize = 40;
    const MAX: usize = 4;
    let up = support::upstream::TestUpstream::start("capped").await;
    let port = free_port();
    let wasp = svc_sidecar(
        port,
        &format!(
            "endpoints = [\"{}\"]\nlimits = {{ max_connections = {MAX} }}\n",
            up.addr
        ),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Every client is connected before the burst, so the requests reach
    // wasp together instead of one handshake apart.
    let start = Arc::new(tokio::sync::Barrier::new(BURST));
    let mut tasks = Vec::new();
    for _ in 0..BURST {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(proxy).await.ok()?;
            start.wait().await;
            let req = "GET /slow?ms=1000 HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n";
            tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes())
                .await
                .ok()?;
            let mut out = Vec::new();
            let read = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut out);
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .ok()?
                .ok()?;
            let text = String::from_utf8_lossy(&out).to_lowercase();
            let status: u16 = text.get(9..12)?.parse().ok()?;
            let overflow = text.contains("\r\nx-wasp-error: overflow\r\n");
            Some((status, overflow))
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().expect("an answer within 10s"));
    }
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let overflow = answers.iter().filter(|a| **a == (503, true)).count();
    let accepted = up.accepted.load(Ordering::SeqCst);
    println!(
        "{BURST} concurrent requests, max_connections = {MAX}: {ok} answered 200, \
         {overflow} 503 overflow; the upstream accepted {accepted} connections"
    );
    assert!(
        accepted <= MAX,
        "{accepted} connections opened; {answers:?}"
    );
    assert_eq!(ok + overflow, BURST, "{answers:?}");
    assert!(ok >= 1, "{answers:?}");
    let m = wasp.metrics();
    assert_eq!(
        metric_value(&m, "wasp_cluster_overflows_total", &["cluster=\"svc\""]),
        Some(overflow as f64),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "wasp_upstream_connections_total", &["cluster=\"svc\""]),
        Some(accepted as f64),
        "{m}"
    );
}

/// A dial that fails gives its place under `max_connections` back: with a
/// limit of one, every try at a refusing endpoint is a connect failure,
/// never an overflow left behind by the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_gives_its_connection_place_back() {
    // Port 1 (tcpmux): nothing listens there, and no other test can bind it.
    let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let port = free_port();
    let _wasp = svc_sidecar(
        port,
        &format!("endpoints = [\"{dead}\"]\nlimits = {{ max_connections = 1 }}\n"),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    for _ in 0..4 {
        let answer = get(&client, proxy, "svc", "/").await;
        assert_eq!(
            (answer.status, answer.header("x-wasp-error")),
            (502, Some("upstream_connect")),
            "{answer:?}"
        );
    }
}
