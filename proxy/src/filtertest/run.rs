//! Runs one fixture case through the real filter engine and records what
//! a client, the upstream and the callout clusters would have seen.
//!
//! Each case gets a fresh [`FilterRuntime`] on a thread of its own (a
//! current-thread tokio runtime, as a wasp worker has), so metrics, shared
//! data and instances never leak from one case into the next. The harness
//! plays the proxy around the chain: it sends the request through
//! [`StreamFilters`] the way `forward` does (headers, body, trailers; then
//! the response in reverse), answers as the fixture's upstream, and answers
//! `http_call`s from the fixture's `callouts`. Around the chain it does
//! what the proxy does to headers: `x-request-id` before the chain, the
//! hop-by-hop strip and `x-forwarded-*`/`via` on the way to the upstream,
//! the strip and `via` on the response before the response filters (the
//! same functions as `forward`), and it honours a filter's `wasp.cluster`.
//! It yields to the runtime between phases and chunks, as a worker does
//! between network reads, so callout answers arrive. What it does not do:
//! route matching and connection handling.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Response, StatusCode};

use super::capture;
use super::fixture::{Callout, Case, FilterSection, Headers};
use crate::filter::{
    BodyVerdict, CalloutFuture, FilterRuntime, FilterSet, FilterSpec, HttpCallouts, PipelineEntry,
    StreamFilters, StreamInfo, Verdict,
};
use crate::forward;

/// Longest a case may take (a filter that never resumes, say).
const CASE_LIMIT: Duration = Duration::from_secs(30);

/// Longest the harness waits for instances to be built and callouts to be
/// answered, after loading and before ending the stream.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Where the harness's client connects from.
const CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// A request as the upstream (or a callout cluster) received it.
#[derive(Debug, Default)]
pub struct SeenRequest {
    pub cluster: String,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// What was forwarded (all of it unless `cut`).
    pub body: Bytes,
    pub trailers: HeaderMap,
    /// A filter answered the client mid-body: the upstream request was
    /// abandoned after its head and `body` (the client got the answer).
    pub cut: bool,
}

/// The response as the client received it.
#[derive(Debug, Default)]
pub struct SeenResponse {
    pub status: u16,
    pub headers: HeaderMap,
    /// What was forwarded (all of it unless `cut`).
    pub body: Bytes,
    pub trailers: HeaderMap,
    /// A filter answered during the response body or trailers: the head and
    /// `body` had gone out, then the stream was reset (as the proxy does).
    pub cut: bool,
}

/// Everything observable about one case.
#[derive(Debug, Default)]
pub struct Observed {
    /// The module did not load (then nothing else ran).
    pub load_error: Option<String>,
    /// `None`: the request never reached the upstream.
    pub upstream: Option<SeenRequest>,
    pub response: SeenResponse,
    /// The filter's log lines (`level: message`, `stdout: text`).
    pub logs: Vec<String>,
    /// Prometheus text of the filter's metrics after the case.
    pub metrics: String,
    pub callouts: Vec<SeenRequest>,
}

/// Answers `http_call`s from the fixture and records them.
struct FixtureCallouts {
    answers: Vec<Callout>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// Answers not yet handed back (so the harness can wait for them).
    in_flight: Arc<AtomicUsize>,
}

/// Counts one callout as in flight until its future ends or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpCallouts for FixtureCallouts {
    fn call(
        &self,
        cluster: &str,
        req: http::Request<Bytes>,
        _timeout: Duration,
    ) -> Option<CalloutFuture> {
        let (parts, body) = req.into_parts();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // The n-th call to a cluster gets its n-th answer; the last repeats.
        let earlier = seen.iter().filter(|s| s.cluster == cluster).count();
        seen.push(SeenRequest {
            cluster: cluster.to_string(),
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
            headers: parts.headers,
            body,
            trailers: HeaderMap::new(),
            cut: false,
        });
        drop(seen);
        let answers: Vec<&Callout> = self
            .answers
            .iter()
            .filter(|c| c.cluster == cluster)
            .collect();
        let answer = (*answers.get(earlier).or(answers.last())?).clone();
        let in_flight = InFlight::new(&self.in_flight);
        Some(Box::pin(async move {
            let _in_flight = in_flight;
            if let Some(why) = answer.fail {
                return Err(why);
            }
            let mut resp = Response::new(Bytes::from(answer.body.into_bytes()));
            *resp.status_mut() = StatusCode::from_u16(answer.status)
                .map_err(|_| format!("callout status {} is not valid", answer.status))?;
            *resp.headers_mut() = header_map(&answer.headers)?;
            Ok(resp)
        }))
    }
}

/// Fixture headers as a map; an invalid name or value is an error.
pub fn header_map(h: &Headers) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, values) in h {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("\"{name}\" is not a valid header name"))?;
        for v in values.list() {
            let v = HeaderValue::from_str(&v)
                .map_err(|_| format!("header {name}: {v:?} is not a valid value"))?;
            map.try_append(n.clone(), v)
                .map_err(|_| format!("header {name}: more header values than a map holds"))?;
        }
    }
    Ok(map)
}

/// A TOML table reaches the guest as JSON; a string as its raw bytes (as
/// wasp.toml's `config`).
fn config_bytes(value: Option<&toml::Value>) -> Bytes {
    match value {
        None => Bytes::new(),
        Some(toml::Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => serde_json::to_vec(v).map(Bytes::from).unwrap_or_default(),
    }
}

/// The root context a case's stream runs on, configuring `spec` for it: a
/// route's override is the filter's per-route config 1 (one extra root),
/// unless its bytes are the filter's own config (config 0, no extra root),
/// as `snapshot` numbers them.
fn route_variant(spec: &mut FilterSpec, route_config: Option<&toml::Value>) -> u32 {
    match route_config.map(|v| config_bytes(Some(v))) {
        Some(bytes) if bytes != spec.config => {
            spec.route_configs = vec![bytes];
            1
        }
        _ => 0,
    }
}

/// Runs `case` on a thread of its own; an `Err` is a case that could not be
/// run (bad fixture values, a harness failure), not a mismatch.
/// `cache`: where compiled modules are kept between cases (`None`: compile
/// for each case).
pub fn run_case(
    module: &Path,
    filter: &FilterSection,
    case: &Case,
    cache: Option<&Path>,
) -> Result<Observed, String> {
    let mut spec = FilterSpec::new(filter.name.clone(), module);
    spec.config = config_bytes(case.config.as_ref().or(filter.config.as_ref()));
    let variant = route_variant(&mut spec, case.route_config.as_ref());
    spec.vm_config = config_bytes(filter.vm_config.as_ref());
    spec.fail = filter.fail;
    let l = &filter.limits;
    spec.cpu_limit = l.cpu.0;
    spec.memory_limit = l.memory.0;
    spec.instances = l.instances;
    spec.tick_min = l.tick_min.0;
    spec.root_cpu = l.root_cpu.0;
    spec.host_limits = l.host_limits();
    spec.max_body_bytes = filter.max_body_bytes.0;
    let answers = case.callouts.clone();
    let request = Prepared::new(case)?;
    let cache = cache.map(Path::to_path_buf);
    let handle = std::thread::Builder::new()
        .name("wasp-filter-test".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            rt.block_on(async move {
                tokio::time::timeout(CASE_LIMIT, observe(spec, variant, answers, request, cache))
                    .await
                    .unwrap_or_else(|_| Err(format!("the case did not finish in {CASE_LIMIT:?}")))
            })
        })
        .map_err(|e| format!("cannot start the case's thread: {e}"))?;
    handle
        .join()
        .unwrap_or_else(|_| Err("the harness panicked (a wasp bug)".to_string()))
}

/// Whether a case's values (headers, statuses, addresses) are usable; the
/// message names what is not.
pub fn check_case(case: &Case) -> Result<(), String> {
    Prepared::new(case)?;
    for (i, c) in case.callouts.iter().enumerate() {
        header_map(&c.headers).map_err(|e| format!("callouts[{i}]: {e}"))?;
        StatusCode::from_u16(c.status)
            .map_err(|_| format!("callouts[{i}].status {} is not valid", c.status))?;
    }
    Ok(())
}

/// The fixture's request and upstream answer, checked and built.
struct Prepared {
    route: Arc<str>,
    cluster: Arc<str>,
    address: SocketAddr,
    head: http::request::Parts,
    body: Vec<Bytes>,
    trailers: HeaderMap,
    upstream: http::response::Parts,
    upstream_body: Vec<Bytes>,
    upstream_trailers: HeaderMap,
}

/// A fixture body as the chunks it is sent in (none for an empty body).
fn chunks(field: &str, body: &str, chunks: &[String]) -> Result<Vec<Bytes>, String> {
    if !chunks.is_empty() && !body.is_empty() {
        return Err(format!("{field}: give body or chunks, not both"));
    }
    if chunks.is_empty() {
        return Ok(if body.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::from(body.to_string())]
        });
    }
    Ok(chunks.iter().map(|c| Bytes::from(c.clone())).collect())
}

fn total(chunks: &[Bytes]) -> usize {
    chunks.iter().map(Bytes::len).sum()
}

impl Prepared {
    fn new(case: &Case) -> Result<Self, String> {
        let r = &case.request;
        let body = chunks("request", &r.body, &r.chunks)?;
        let mut headers = header_map(&r.headers).map_err(|e| format!("request: {e}"))?;
        if !headers.contains_key(HOST) {
            let host = HeaderValue::from_str(&r.authority)
                .map_err(|_| format!("request.authority {:?} is not valid", r.authority))?;
            headers.insert(HOST, host);
        }
        // As a client sends it.
        if !body.is_empty()
            && !headers.contains_key(CONTENT_LENGTH)
            && !headers.contains_key(TRANSFER_ENCODING)
        {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(total(&body)));
        }
        let (mut head, ()) = http::Request::builder()
            .method(r.method.as_str())
            .uri(r.path.as_str())
            .body(())
            .map_err(|e| format!("request: method {:?} / path {:?}: {e}", r.method, r.path))?
            .into_parts();
        head.headers = headers;
        let u = &case.upstream;
        let upstream_body = chunks("upstream", &u.body, &u.chunks)?;
        let address = u
            .address
            .parse()
            .map_err(|_| format!("upstream.address {:?} is not ip:port", u.address))?;
        let mut up_headers = header_map(&u.headers).map_err(|e| format!("upstream: {e}"))?;
        if !up_headers.contains_key(CONTENT_LENGTH) && !up_headers.contains_key(TRANSFER_ENCODING) {
            up_headers.insert(CONTENT_LENGTH, HeaderValue::from(total(&upstream_body)));
        }
        let status = StatusCode::from_u16(u.status)
            .map_err(|_| format!("upstream.status {} is not valid", u.status))?;
        let (mut upstream, ()) = Response::new(()).into_parts();
        upstream.status = status;
        upstream.headers = up_headers;
        Ok(Prepared {
            route: Arc::from(u.route.as_str()),
            cluster: Arc::from(u.cluster.as_str()),
            address,
            head,
            body,
            trailers: header_map(&r.trailers).map_err(|e| format!("request.trailers: {e}"))?,
            upstream,
            upstream_body,
            upstream_trailers: header_map(&u.trailers)
                .map_err(|e| format!("upstream.trailers: {e}"))?,
        })
    }
}

fn client_response(r: Response<Bytes>) -> SeenResponse {
    let (parts, body) = r.into_parts();
    SeenResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        trailers: HeaderMap::new(),
        cut: false,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

impl Side {
    fn dir(self) -> crate::filter::Dir {
        match self {
            Side::Request => crate::filter::Dir::Request,
            Side::Response => crate::filter::Dir::Response,
        }
    }
}

/// Lets spawned tasks (callouts, instance pumps, root drivers) run, as a
/// worker does between two reads from the network.
async fn breathe() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Waits (within [`SETTLE_LIMIT`]) until this worker's instances are built
/// and every `http_call` has been answered and delivered.
async fn settle(set: &Arc<FilterSet>, in_flight: &AtomicUsize) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        breathe().await;
        if in_flight.load(Ordering::Relaxed) == 0 && !set.building_on_worker() {
            // The last answers may still sit in a root driver's channel.
            breathe().await;
            return;
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What passed a body (and trailers) through the chain.
struct Through {
    /// What the chain forwarded.
    body: Bytes,
    /// A filter answered instead, after `body` had been forwarded.
    local: Option<Response<Bytes>>,
}

/// A body (and trailers) through the chain as `forward` sends them: the
/// chunks, the last one ending the stream, or, with trailers, an empty
/// end-of-stream chunk and then the trailers.
async fn body_through(
    chain: &mut StreamFilters,
    side: Side,
    body: Vec<Bytes>,
    trailers: &mut HeaderMap,
) -> Through {
    let mut out = BytesMut::new();
    let has_trailers = !trailers.is_empty();
    let last = body.len().saturating_sub(1);
    let mut chunks: Vec<(Bytes, bool)> = body
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i == last && !has_trailers))
        .collect();
    if has_trailers {
        chunks.push((Bytes::new(), true));
    }
    for (chunk, eos) in chunks {
        breathe().await;
        let mut v = match side {
            Side::Request => chain.request_body(chunk, eos),
            Side::Response => chain.response_body(chunk, eos),
        };
        if let BodyVerdict::Wait = v {
            // A filter waits for a callout before letting the body go, as
            // the proxy's body does (`forward/filtered.rs`).
            let dir = side.dir();
            v = std::future::poll_fn(|cx| chain.poll_body_wait(cx, dir)).await;
        }
        match v {
            BodyVerdict::Forward(b) => out.extend_from_slice(&b),
            BodyVerdict::Hold | BodyVerdict::Wait => {}
            BodyVerdict::Respond(r) => {
                return Through {
                    body: out.freeze(),
                    local: Some(r),
                }
            }
        }
    }
    if has_trailers {
        breathe().await;
        let mut v = match side {
            Side::Request => chain.request_trailers(trailers),
            Side::Response => chain.response_trailers(trailers),
        };
        if let Verdict::Wait = v {
            let dir = side.dir();
            v = std::future::poll_fn(|cx| chain.poll_trailers_wait(cx, dir, trailers)).await;
        }
        if let Verdict::Respond(r) = v {
            return Through {
                body: out.freeze(),
                local: Some(r),
            };
        }
    }
    Through {
        body: out.freeze(),
        local: None,
    }
}

/// A filter's own answer goes back through the response callbacks, as the
/// proxy sends it (`forward::phases::filter_answer`); an answer made for a
/// failure goes out as made.
async fn through_response(chain: &mut StreamFilters, r: Response<Bytes>) -> Response<Bytes> {
    if r.extensions().get::<crate::filter::FilterReply>().is_none() {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let no_body = body.is_empty();
    if let Verdict::Respond(again) = chain.response_headers(&mut parts, no_body).await {
        return again;
    }
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(TRANSFER_ENCODING);
    let body = if no_body {
        body
    } else {
        let mut none = HeaderMap::new();
        let sent = body_through(chain, Side::Response, vec![body], &mut none).await;
        // A body callback's own answer replaces the reply, as in the proxy.
        if let Some(again) = sent.local {
            return again;
        }
        sent.body
    };
    Response::from_parts(parts, body)
}

/// The upstream request's head as the proxy sends it after the request
/// filters (no `trust_forwarded` peers, HTTP/1.1 client).
fn as_forwarded(headers: &mut HeaderMap) {
    // `Connection: x-request-id` must not take the id away, as in forward.
    let id = headers.get(&forward::REQUEST_ID).cloned();
    forward::strip_hop_by_hop(headers, false);
    if let Some(id) = id {
        headers.entry(forward::REQUEST_ID).or_insert(id);
    }
    headers.remove(EXPECT);
    forward::add_forwarding(headers, CLIENT.ip(), "http", forward::VIA_H1, false);
}

async fn observe(
    spec: FilterSpec,
    variant: u32,
    answers: Vec<Callout>,
    mut p: Prepared,
    cache: Option<std::path::PathBuf>,
) -> Result<Observed, String> {
    capture::clear();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let callouts = Arc::new(FixtureCallouts {
        answers,
        seen: seen.clone(),
        in_flight: in_flight.clone(),
    });
    let runtime = FilterRuntime::new(cache, callouts).map_err(|e| format!("{e:#}"))?;
    runtime.set_workers(1);
    let name: Arc<str> = Arc::from(spec.name.as_str());
    let mut observed = Observed::default();
    let set = match runtime.load(vec![spec]) {
        Ok(set) => set,
        Err(e) => {
            observed.load_error = Some(format!("{e:#}"));
            observed.logs = capture::take();
            return Ok(observed);
        }
    };
    // A proxy serves requests long after its filters started: callouts
    // made in on_vm_start / on_configure have their answers by then.
    set.prepare_worker();
    settle(&set, &in_flight).await;
    let request_id = forward::ensure_request_id(&mut p.head.headers);
    let info = StreamInfo {
        listener: Arc::from("filter-test"),
        source: CLIENT,
        destination: SocketAddr::from(([127, 0, 0, 1], 15006)),
        scheme: "http",
        protocol: "HTTP/1.1",
        request_id: Arc::from(String::from_utf8_lossy(request_id.as_bytes())),
        start: SystemTime::now(),
        principal: None,
        tls: None,
    };
    let entry = PipelineEntry {
        name,
        config: variant,
    };
    let mut chain = set.route_stream(std::slice::from_ref(&entry), info);
    let request_size = total(&p.body) as u64;
    let mut response_size = 0;

    let eos = p.body.is_empty() && p.trailers.is_empty();
    let mut local = match chain.request_headers(&mut p.head, eos).await {
        Verdict::Respond(r) => Some(r),
        // Header phases resolve their own waits.
        Verdict::Continue | Verdict::Wait => None,
    };
    if local.is_none() {
        // Routing happens here in the proxy, after the request headers; a
        // filter may have picked the cluster.
        let cluster = match chain.property("wasp.cluster") {
            Some(c) => Arc::from(String::from_utf8_lossy(&c).as_ref()),
            None => p.cluster.clone(),
        };
        chain.set_route(p.route.clone(), cluster.clone());
        chain.set_upstream(p.address);
        as_forwarded(&mut p.head.headers);
        let sent = body_through(&mut chain, Side::Request, p.body.clone(), &mut p.trailers).await;
        let cut = sent.local.is_some();
        observed.upstream = Some(SeenRequest {
            cluster: cluster.to_string(),
            method: p.head.method.to_string(),
            path: p
                .head
                .uri
                .path_and_query()
                .map_or_else(|| p.head.uri.path().to_string(), |q| q.to_string()),
            headers: p.head.headers.clone(),
            body: sent.body,
            trailers: if cut {
                HeaderMap::new()
            } else {
                p.trailers.clone()
            },
            cut,
        });
        // The proxy abandons the upstream request and sends this instead.
        local = sent.local;
    }
    observed.response = match local {
        Some(r) => client_response(through_response(&mut chain, r).await),
        None => {
            breathe().await;
            forward::strip_hop_by_hop(&mut p.upstream.headers, false);
            forward::append_via(&mut p.upstream.headers, forward::VIA_H1);
            let eos = p.upstream_body.is_empty() && p.upstream_trailers.is_empty();
            match chain.response_headers(&mut p.upstream, eos).await {
                Verdict::Respond(r) => client_response(r),
                Verdict::Continue | Verdict::Wait => {
                    let mut trailers = p.upstream_trailers;
                    let sent =
                        body_through(&mut chain, Side::Response, p.upstream_body, &mut trailers)
                            .await;
                    response_size = sent.body.len() as u64;
                    // After the head went out a filter's answer cannot
                    // replace it: the proxy resets the stream.
                    let cut = sent.local.is_some();
                    SeenResponse {
                        status: p.upstream.status.as_u16(),
                        headers: p.upstream.headers,
                        body: sent.body,
                        trailers: if cut { HeaderMap::new() } else { trailers },
                        cut,
                    }
                }
            }
        }
    };
    // Fire-and-forget callouts: answered before the stream ends, as they
    // would be on a proxy that is not in a hurry.
    settle(&set, &in_flight).await;
    chain.finish(request_size, response_size);
    settle(&set, &in_flight).await;
    runtime.render_metrics(&mut observed.metrics);
    observed.callouts = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    observed.logs = capture::take();
    Ok(observed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(cluster: &str, status: u16) -> Callout {
        Callout {
            cluster: cluster.into(),
            status,
            headers: Headers::new(),
            body: String::new(),
            fail: None,
        }
    }

    #[test]
    fn callouts_are_answered_in_order_and_recorded() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let c = FixtureCallouts {
            answers: vec![answer("a", 200), answer("b", 201), answer("a", 403)],
            seen: seen.clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let call = |cluster: &str| {
            let req = http::Request::get("/check")
                .body(Bytes::new())
                .unwrap_or_else(|e| panic!("{e}"));
            c.call(cluster, req, Duration::from_secs(1))
                .map(|f| rt.block_on(f).map(|r| r.status().as_u16()))
        };
        assert_eq!(call("a"), Some(Ok(200)));
        assert_eq!(call("b"), Some(Ok(201)));
        assert_eq!(call("a"), Some(Ok(403)));
        // The last answer repeats.
        assert_eq!(call("a"), Some(Ok(403)));
        // An unknown cluster: no answer (the guest gets BAD_ARGUMENT), but recorded.
        assert!(call("nowhere").is_none());
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let clusters: Vec<&str> = seen.iter().map(|s| s.cluster.as_str()).collect();
        assert_eq!(clusters, ["a", "b", "a", "a", "nowhere"]);
        assert_eq!(seen[0].path, "/check");
    }

    /// A `route_config` with the bytes of the filter's own config runs on
    /// the filter's own root (config 0) and configures no other root; a
    /// different one configures exactly one more, which the stream runs on.
    #[test]
    fn route_config_equal_to_the_own_config_is_the_own_root() {
        let value = |text: &str| -> toml::Value {
            toml::from_str::<toml::Table>(&format!("v = {text}"))
                .unwrap_or_else(|e| panic!("{e}"))
                .remove("v")
                .unwrap_or_else(|| panic!("v"))
        };
        let own = value(r#"{ request = { add = { x-added = "yes" } } }"#);
        let spec = || {
            let mut s = FilterSpec::new("headers", "headers.wasm");
            s.config = config_bytes(Some(&own));
            s
        };

        let mut same = spec();
        assert_eq!(route_variant(&mut same, Some(&own.clone())), 0);
        assert!(same.route_configs.is_empty(), "no extra root");

        let mut other = spec();
        let route = value(r#"{ request = { add = { x-route = "r" } } }"#);
        assert_eq!(route_variant(&mut other, Some(&route)), 1);
        assert_eq!(other.route_configs, vec![config_bytes(Some(&route))]);

        let mut none = spec();
        assert_eq!(route_variant(&mut none, None), 0);
        assert!(none.route_configs.is_empty());

        // A string is passed as is: "" is the bytes of no config at all.
        let mut empty = FilterSpec::new("headers", "headers.wasm");
        assert_eq!(route_variant(&mut empty, Some(&value(r#""""#))), 0);
        assert!(empty.route_configs.is_empty());
    }
}
