//! [`Harness`] (one filter VM with its config), [`Exchange`] (one HTTP stream
//! driven step by step) and [`Completed`] (what came out of a stream).

use super::host::TestHost;
use super::{CalloutRecord, LocalReply, LogLine, Message, MetricValue, TestRequest, TestResponse};
use crate::abi::{encode_path, BufferType, MapType, MetricType, StreamType, ACTION_PAUSE};
use crate::filter::Filter;
use crate::host::{self, Host};
use crate::log::Level;
use crate::props;
use crate::runtime::{Dispatch, Runtime};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::Duration;

const ROOT_ID: u32 = 1;

/// Configures a [`Harness`]: the filter config and the proxy-side facts
/// (listener, route, cluster names) the filter will see.
///
/// ```
/// # use std::rc::Rc;
/// # struct F;
/// # impl wasp_sdk::Filter for F {
/// #     type Config = wasp_sdk::NoConfig; type State = ();
/// #     fn configure(_: wasp_sdk::NoConfig, _: &mut wasp_sdk::Root) -> Result<(), wasp_sdk::ConfigError> { Ok(()) }
/// #     fn new(_: &Rc<()>) -> Self { F }
/// # }
/// use wasp_sdk::testing::Harness;
/// let h = Harness::<F>::new()
///     .config(serde_json::json!({ "any": "thing" }))
///     .listener("outbound")
///     .route("reviews")
///     .cluster("reviews")
///     .known_clusters(["reviews", "reviews-v2", "authz"])
///     .seed(7)
///     .build();
/// # drop(h);
/// ```
pub struct HarnessBuilder<F: Filter> {
    config: Result<Vec<u8>, String>,
    plugin_name: String,
    listener: String,
    route: String,
    cluster: String,
    clusters: Option<BTreeSet<String>>,
    seed: u64,
    props: Vec<(String, Vec<u8>)>,
    _filter: PhantomData<F>,
}

impl<F: Filter> HarnessBuilder<F> {
    /// The config as any serializable value, e.g. `serde_json::json!({...})`.
    pub fn config(mut self, value: impl serde::Serialize) -> Self {
        self.config = serde_json::to_vec(&value).map_err(|e| e.to_string());
        self
    }

    /// The config as JSON text, exactly as the proxy hands it over.
    pub fn config_json(mut self, json: &str) -> Self {
        self.config = Ok(json.as_bytes().to_vec());
        self
    }

    /// The config as TOML: the body of the filter's `config = { ... }`
    /// written as a TOML document (`rules = [ ... ]`).
    pub fn config_toml(mut self, toml_text: &str) -> Self {
        self.config = toml::from_str::<toml::Value>(toml_text)
            .map_err(|e| format!("config_toml: {e}"))
            .and_then(|v| serde_json::to_vec(&v).map_err(|e| e.to_string()));
        self
    }

    /// `plugin_name` (default `test-filter`).
    pub fn plugin_name(mut self, name: &str) -> Self {
        self.plugin_name = name.to_string();
        self
    }

    /// `listener_name` (default `test-listener`).
    pub fn listener(mut self, name: &str) -> Self {
        self.listener = name.to_string();
        self
    }

    /// `route_name` after routing (default `test-route`).
    pub fn route(mut self, name: &str) -> Self {
        self.route = name.to_string();
        self
    }

    /// `cluster_name` after routing, unless the filter sets `wasp.cluster`
    /// (default `test-cluster`).
    pub fn cluster(mut self, name: &str) -> Self {
        self.cluster = name.to_string();
        self
    }

    /// Clusters a callout may target; others fail with BAD_ARGUMENT as in
    /// wasp. Without this, every cluster is accepted.
    pub fn known_clusters<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.clusters = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Seed of the host's random generator (fixed by default, so runs repeat).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A plugin-level property (string value).
    pub fn property(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.props.push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    /// Starts the VM and configures the filter; panics with the filter's
    /// error (and its logs) if it rejects the config.
    #[track_caller]
    pub fn build(self) -> Harness<F> {
        match self.try_build() {
            Ok(h) => h,
            Err(e) => panic!("the filter rejected its config: {e}"),
        }
    }

    /// Like [`build`](Self::build), but returns the rejection message (the
    /// text the filter logged at error level) instead of panicking.
    pub fn try_build(self) -> Result<Harness<F>, String> {
        let config = self.config?;
        let host = Rc::new(TestHost::new(self.seed, self.clusters));
        {
            let mut st = host.st.borrow_mut();
            let mut plugin = vec![
                ("plugin_name".to_string(), self.plugin_name.into_bytes()),
                (
                    "plugin_root_id".to_string(),
                    ROOT_ID.to_string().into_bytes(),
                ),
                ("plugin_vm_id".to_string(), b"test-vm".to_vec()),
                ("listener_name".to_string(), self.listener.into_bytes()),
            ];
            plugin.extend(self.props);
            for (k, v) in plugin {
                st.plugin_props.insert(encode_path(&k), v);
            }
            st.buffers.insert(BufferType::VmConfiguration, Vec::new());
            st.buffers
                .insert(BufferType::PluginConfiguration, config.clone());
        }
        let mut h = Harness {
            host,
            rt: Runtime::new(),
            next_ctx: ROOT_ID + 1,
            route: self.route,
            cluster: self.cluster,
            requests: 0,
            last_tick_ns: 0,
        };
        let ok = h.call(|rt| {
            rt.on_context_create(ROOT_ID, 0);
            rt.on_vm_start(ROOT_ID, 0) && rt.on_configure(ROOT_ID, config.len())
        });
        h.host
            .st
            .borrow_mut()
            .buffers
            .remove(&BufferType::PluginConfiguration);
        h.last_tick_ns = h.host.st.borrow().now_ns;
        if ok {
            Ok(h)
        } else {
            let errors: Vec<String> = h
                .logs()
                .into_iter()
                .filter(|l| l.level >= Level::Error)
                .map(|l| l.message)
                .collect();
            Err(if errors.is_empty() {
                "proxy_on_configure returned false (nothing logged)".to_string()
            } else {
                errors.join("; ")
            })
        }
    }
}

/// One filter, configured, in a simulated proxy VM. Send requests through it
/// with [`run`](Self::run) / [`run_with`](Self::run_with), or step by step with
/// [`request`](Self::request); then look at logs, metrics, shared data.
///
/// Metrics, logs and shared data belong to the VM, so they accumulate across
/// requests like in a real worker.
pub struct Harness<F: Filter> {
    host: Rc<TestHost>,
    rt: Runtime<F>,
    next_ctx: u32,
    route: String,
    cluster: String,
    requests: u64,
    last_tick_ns: u64,
}

impl<F: Filter> Harness<F> {
    /// Starts configuring a harness for `F`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> HarnessBuilder<F> {
        HarnessBuilder {
            config: Ok(Vec::new()),
            plugin_name: "test-filter".into(),
            listener: "test-listener".into(),
            route: "test-route".into(),
            cluster: "test-cluster".into(),
            clusters: None,
            seed: 0x5eed_1234_abcd_0001,
            props: Vec::new(),
            _filter: PhantomData,
        }
    }

    fn call<R>(&mut self, f: impl FnOnce(&mut Runtime<F>) -> R) -> R {
        let _guard = host::enter(self.host.clone() as Rc<dyn Host>);
        f(&mut self.rt)
    }

    /// Runs `req` through the whole stream with a `200` upstream response
    /// and returns what came out. Panics, saying why, if the filter leaves
    /// the stream paused (use [`request`](Self::request) to answer callouts).
    #[track_caller]
    pub fn run(&mut self, req: TestRequest) -> Completed {
        self.run_with(req, TestResponse::ok())
    }

    /// Like [`run`](Self::run) with the upstream answering `resp`.
    #[track_caller]
    pub fn run_with(&mut self, req: TestRequest, resp: TestResponse) -> Completed {
        let mut ex = self.request(req);
        if ex.local_response().is_none() {
            ex.expect_not_paused("run");
            ex.respond(resp);
            ex.expect_not_paused("run");
        }
        ex.finish()
    }

    /// Starts a stream and runs the request side (headers, body, trailers)
    /// as far as the filter lets it go.
    pub fn request(&mut self, req: TestRequest) -> Exchange<'_, F> {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        self.requests += 1;
        let request_id = req
            .header_value("x-request-id")
            .map(str::to_string)
            .unwrap_or_else(|| format!("test-request-{}", self.requests));
        {
            let mut st = self.host.st.borrow_mut();
            st.stream_props.clear();
            st.props_set.clear();
            st.local = None;
            st.continued.clear();
            st.maps.clear();
            st.buffers
                .retain(|k, _| !matches!(k, BufferType::RequestBody | BufferType::ResponseBody));
            let path = req.header_value(":path").unwrap_or("/").to_string();
            let url_path = path.split('?').next().unwrap_or("/").to_string();
            let now = st.now_ns;
            let port = req
                .source
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<i64>().ok())
                .unwrap_or(0);
            let strings = [
                (props::REQUEST_PATH, path),
                (props::REQUEST_URL_PATH, url_path),
                (
                    props::REQUEST_HOST,
                    req.header_value(":authority").unwrap_or("").to_string(),
                ),
                (
                    props::REQUEST_SCHEME,
                    req.header_value(":scheme").unwrap_or("http").to_string(),
                ),
                (
                    props::REQUEST_METHOD,
                    req.header_value(":method").unwrap_or("GET").to_string(),
                ),
                (props::REQUEST_ID, request_id),
                (props::REQUEST_PROTOCOL, "HTTP/1.1".to_string()),
                (props::SOURCE_ADDRESS, req.source.clone()),
                (props::DESTINATION_ADDRESS, "127.0.0.1:15001".to_string()),
            ];
            for (k, v) in strings {
                st.stream_props.insert(encode_path(k), v.into_bytes());
            }
            let ints = [
                (props::REQUEST_TIME, now as i64),
                ("source.port", port),
                ("destination.port", 15001),
            ];
            for (k, v) in ints {
                st.stream_props
                    .insert(encode_path(k), v.to_le_bytes().to_vec());
            }
            st.maps.insert(MapType::RequestHeaders, req.headers.clone());
        }
        self.call(|rt| rt.on_context_create(ctx, ROOT_ID));
        let mut ex = Exchange {
            h: self,
            ctx,
            req,
            resp: None,
            phase: Phase::RequestHeaders,
            paused: None,
            buffering: false,
            routed: false,
            flush_pending: false,
            received_in: 0,
            forwarded_body: Vec::new(),
            upstream: None,
            downstream: None,
            local: None,
            finished: false,
            hooks: Vec::new(),
        };
        ex.drive();
        ex
    }

    /// Every line logged so far (configure included), oldest first.
    pub fn logs(&self) -> Vec<LogLine> {
        self.host.st.borrow().logs.clone()
    }

    /// The logged lines at exactly `level`, as text.
    pub fn log_lines(&self, level: Level) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| l.level == level)
            .map(|l| l.message)
            .collect()
    }

    /// Returns and clears the logged lines.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.host.st.borrow_mut().logs)
    }

    /// Panics (listing every logged line) unless a line at `level` contains
    /// `needle`.
    #[track_caller]
    pub fn assert_logged(&self, level: Level, needle: &str) {
        let logs = self.logs();
        if logs
            .iter()
            .any(|l| l.level == level && l.message.contains(needle))
        {
            return;
        }
        let mut msg = format!("no {level} log line contains {needle:?}; logged:\n");
        for l in &logs {
            let _ = writeln!(msg, "  [{}] {}", l.level, l.message);
        }
        if logs.is_empty() {
            msg.push_str("  (nothing)\n");
        }
        panic!("{msg}");
    }

    /// A metric by exact name.
    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        let st = self.host.st.borrow();
        let m = st.metrics.iter().find(|m| m.name == name)?;
        Some(match m.kind {
            MetricType::Counter => MetricValue::Counter(m.value as u64),
            MetricType::Gauge => MetricValue::Gauge(m.value),
            MetricType::Histogram => MetricValue::Histogram(m.samples.clone()),
        })
    }

    /// Names of all defined metrics, in definition order.
    pub fn metric_names(&self) -> Vec<String> {
        self.host
            .st
            .borrow()
            .metrics
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    #[track_caller]
    fn missing_metric(&self, kind: &str, name: &str) -> ! {
        let mut msg = format!("no {kind} named {name:?}; defined metrics:\n");
        for n in self.metric_names() {
            let _ = writeln!(msg, "  {n}");
        }
        panic!("{msg}")
    }

    /// A counter's value; panics (listing defined metrics) if absent.
    #[track_caller]
    pub fn counter(&self, name: &str) -> u64 {
        match self.metric(name) {
            Some(MetricValue::Counter(v)) => v,
            _ => self.missing_metric("counter", name),
        }
    }

    /// A gauge's value; panics if absent.
    #[track_caller]
    pub fn gauge(&self, name: &str) -> i64 {
        match self.metric(name) {
            Some(MetricValue::Gauge(v)) => v,
            _ => self.missing_metric("gauge", name),
        }
    }

    /// A histogram's samples; panics if absent.
    #[track_caller]
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        match self.metric(name) {
            Some(MetricValue::Histogram(v)) => v,
            _ => self.missing_metric("histogram", name),
        }
    }

    /// A shared-data value.
    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        self.host
            .st
            .borrow()
            .shared
            .get(key)
            .map(|(v, _)| v.clone())
    }

    /// Sets a shared-data value (as another worker would).
    pub fn set_shared(&mut self, key: &str, value: impl AsRef<[u8]>) {
        let mut st = self.host.st.borrow_mut();
        let cas = st.shared.get(key).map_or(0, |(_, c)| *c) + 1;
        st.shared
            .insert(key.to_string(), (value.as_ref().to_vec(), cas));
    }

    /// The timer period the filter asked for, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        match self.host.st.borrow().tick_ms {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    /// Fires the timer once (`on_tick`), whatever the period.
    pub fn tick(&mut self) {
        self.call(|rt| rt.on_tick(ROOT_ID));
    }

    /// Moves the clock forward by `by`, firing `on_tick` each time a tick
    /// period has elapsed since the previous tick (or since start-up).
    pub fn advance(&mut self, by: Duration) {
        let target = self.host.st.borrow().now_ns + by.as_nanos() as u64;
        while let Some(step) = self.tick_period() {
            let due = self.last_tick_ns + step.as_nanos() as u64;
            if due > target {
                break;
            }
            self.host.st.borrow_mut().now_ns = due;
            self.last_tick_ns = due;
            self.tick();
        }
        self.host.st.borrow_mut().now_ns = target;
    }

    /// Callouts sent and not answered yet (from any context).
    pub fn pending_callouts(&self) -> Vec<CalloutRecord> {
        self.host.st.borrow().callouts.clone()
    }

    /// Answers the oldest pending callout with `resp` (for callouts sent from
    /// `configure`/`on_tick`; in a stream use [`Exchange::answer_callout`]).
    #[track_caller]
    pub fn answer_callout(&mut self, resp: TestResponse) -> CalloutRecord {
        self.answer(Some(resp))
    }

    #[track_caller]
    fn answer(&mut self, resp: Option<TestResponse>) -> CalloutRecord {
        let call = {
            let mut st = self.host.st.borrow_mut();
            if st.callouts.is_empty() {
                drop(st);
                panic!("answer_callout: the filter has no pending callout");
            }
            st.callouts.remove(0)
        };
        let (headers, body, trailers) = match &resp {
            Some(r) => (r.header_pairs(), r.chunks.concat(), r.trailers.clone()),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        let (nh, nb, nt) = (headers.len(), body.len(), trailers.len());
        {
            let mut st = self.host.st.borrow_mut();
            st.maps.insert(MapType::HttpCallResponseHeaders, headers);
            st.maps.insert(MapType::HttpCallResponseTrailers, trailers);
            st.buffers.insert(BufferType::HttpCallResponseBody, body);
        }
        let token = call.id.token();
        self.call(|rt| rt.on_http_call_response(ROOT_ID, token, nh, nb, nt));
        let mut st = self.host.st.borrow_mut();
        st.maps.remove(&MapType::HttpCallResponseHeaders);
        st.maps.remove(&MapType::HttpCallResponseTrailers);
        st.buffers.remove(&BufferType::HttpCallResponseBody);
        call
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    RequestHeaders,
    RequestBody(usize),
    RequestTrailers,
    Upstream,
    ResponseHeaders,
    ResponseBody(usize),
    ResponseTrailers,
    Done,
}

/// One HTTP stream in progress. Created by [`Harness::request`], which has
/// already run the request hooks as far as the filter allowed.
///
/// ```
/// use std::rc::Rc;
/// use wasp_sdk::{Action, Callout, CalloutResponse, ConfigError, Filter, LocalResponse, Request, Root};
/// use wasp_sdk::testing::{Harness, TestRequest, TestResponse};
///
/// struct Authz;
/// impl Filter for Authz {
///     type Config = wasp_sdk::NoConfig;
///     type State = ();
///     fn configure(_: wasp_sdk::NoConfig, _: &mut Root) -> Result<(), ConfigError> { Ok(()) }
///     fn new(_: &Rc<()>) -> Self { Authz }
///     fn on_request_headers(&mut self, req: &mut Request) -> Action {
///         let user = req.header("x-user").unwrap_or_default();
///         match Callout::get("authz", &format!("/allow?user={user}")).send() {
///             Ok(_) => Action::Pause,
///             Err(_) => LocalResponse::text(503, "authz unavailable").into(),
///         }
///     }
///     fn on_callout_response(&mut self, resp: &CalloutResponse, _: &mut Request) -> Action {
///         if resp.is_success() { Action::Continue } else { LocalResponse::new(403).into() }
///     }
/// }
///
/// let mut h = Harness::<Authz>::new().known_clusters(["authz"]).build();
///
/// let mut ex = h.request(TestRequest::get("/").header("x-user", "ann"));
/// assert!(ex.is_paused());
/// assert_eq!(ex.pending_callouts()[0].path(), "/allow?user=ann");
/// ex.answer_callout(TestResponse::ok());
/// assert!(ex.upstream_request().is_some());
/// ex.respond(TestResponse::ok());
/// assert_eq!(ex.finish().status(), 200);
///
/// let mut ex = h.request(TestRequest::get("/").header("x-user", "eve"));
/// ex.answer_callout(TestResponse::new(401));
/// assert_eq!(ex.finish().status(), 403);
/// ```
pub struct Exchange<'h, F: Filter> {
    h: &'h mut Harness<F>,
    ctx: u32,
    req: TestRequest,
    resp: Option<TestResponse>,
    phase: Phase,
    paused: Option<&'static str>,
    buffering: bool,
    routed: bool,
    flush_pending: bool,
    received_in: usize,
    forwarded_body: Vec<u8>,
    upstream: Option<Message>,
    downstream: Option<Message>,
    local: Option<LocalReply>,
    finished: bool,
    hooks: Vec<(&'static str, &'static str)>,
}

impl<F: Filter> Exchange<'_, F> {
    /// True while the filter holds the stream (returned `Pause` and has not
    /// resumed it).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// The hook that paused the stream, e.g. `"on_request_headers"`.
    pub fn paused_at(&self) -> Option<&'static str> {
        self.paused
    }

    /// The local response the filter sent, if any.
    pub fn local_response(&self) -> Option<&LocalReply> {
        self.local.as_ref()
    }

    /// The request as it reached the upstream (after all request hooks), or
    /// `None` while paused / after a local response.
    pub fn upstream_request(&self) -> Option<&Message> {
        self.upstream.as_ref()
    }

    /// What the client received so far (after the response hooks or a local
    /// response).
    pub fn downstream_response(&self) -> Option<&Message> {
        self.downstream.as_ref()
    }

    /// A request header as it is now (e.g. while paused).
    pub fn request_header(&self, name: &str) -> Option<String> {
        let st = self.h.host.st.borrow();
        st.maps
            .get(&MapType::RequestHeaders)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// A property as it is now (string, lossy).
    pub fn property(&self, name: &str) -> Option<String> {
        let st = self.h.host.st.borrow();
        let path = encode_path(name);
        st.stream_props
            .get(&path)
            .or_else(|| st.plugin_props.get(&path))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Callouts sent and not yet answered.
    pub fn pending_callouts(&self) -> Vec<CalloutRecord> {
        self.h.pending_callouts()
    }

    /// Answers the oldest pending callout with `resp` and lets the stream
    /// go on as the filter decides. Returns the callout that was answered.
    #[track_caller]
    pub fn answer_callout(&mut self, resp: TestResponse) -> CalloutRecord {
        let call = self.h.answer(Some(resp));
        self.after_resume();
        call
    }

    /// Fails the oldest pending callout (no response: timeout or reset).
    #[track_caller]
    pub fn fail_callout(&mut self) -> CalloutRecord {
        let call = self.h.answer(None);
        self.after_resume();
        call
    }

    /// The upstream answers with `resp`: runs the response hooks.
    #[track_caller]
    pub fn respond(&mut self, resp: TestResponse) -> &mut Self {
        if self.local.is_some() {
            panic!(
                "respond: the filter already answered locally with {}",
                self.describe_local()
            );
        }
        if self.phase != Phase::Upstream {
            panic!(
                "respond: the request has not reached the upstream yet (paused at {}); \
                 answer its callouts first",
                self.paused.unwrap_or("?")
            );
        }
        {
            let mut st = self.h.host.st.borrow_mut();
            st.maps
                .insert(MapType::ResponseHeaders, resp.header_pairs());
            st.stream_props.insert(
                encode_path(props::RESPONSE_CODE),
                i64::from(resp.status).to_le_bytes().to_vec(),
            );
        }
        self.forwarded_body.clear();
        self.buffering = false;
        self.resp = Some(resp);
        self.phase = Phase::ResponseHeaders;
        self.drive();
        self
    }

    /// Ends the stream: runs `on_log` (then done/delete) and returns what
    /// happened. Works in any state (a paused stream ends like a reset).
    pub fn finish(mut self) -> Completed {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> Completed {
        self.finished = true;
        let latency = self
            .resp
            .as_ref()
            .map_or(Duration::from_millis(1), |r| r.latency);
        let downstream = self.downstream.clone().unwrap_or_default();
        {
            let mut st = self.h.host.st.borrow_mut();
            let mut set = |k: &str, v: i64| {
                st.stream_props
                    .insert(encode_path(k), v.to_le_bytes().to_vec());
            };
            set(props::REQUEST_DURATION, latency.as_nanos() as i64);
            set(props::REQUEST_SIZE, self.received_in as i64);
            set(props::RESPONSE_SIZE, downstream.body.len() as i64);
            if let Some(code) = downstream.status() {
                set(props::RESPONSE_CODE, i64::from(code));
            }
        }
        let ctx = self.ctx;
        self.h.call(|rt| {
            rt.on_log(ctx);
            if rt.on_done(ctx) {
                rt.on_delete(ctx);
            }
        });
        let st = self.h.host.st.borrow();
        Completed {
            upstream: self.upstream.clone(),
            response: downstream,
            local: self.local.clone(),
            properties: st.props_set.clone(),
            paused: self.paused,
            hooks: self.hooks.clone(),
        }
    }

    #[track_caller]
    fn expect_not_paused(&self, what: &str) {
        if let Some(at) = self.paused {
            let calls = self.h.pending_callouts();
            let detail = if calls.is_empty() {
                "and sent no callout".to_string()
            } else {
                let list: Vec<String> = calls
                    .iter()
                    .map(|c| format!("{} {} {}", c.cluster, c.method(), c.path()))
                    .collect();
                format!("waiting for callouts: [{}]", list.join(", "))
            };
            panic!(
                "{what}: the filter paused the stream in {at} {detail}. \
                 Use Harness::request(..) and Exchange::answer_callout(..) to drive it."
            );
        }
    }

    fn describe_local(&self) -> String {
        match &self.local {
            Some(l) => format!("{} {:?}", l.status, l.body_text()),
            None => "nothing".into(),
        }
    }

    fn hook(&mut self, name: &'static str, f: impl FnOnce(&mut Runtime<F>, u32) -> u32) -> bool {
        let ctx = self.ctx;
        let code = self.h.call(|rt| f(rt, ctx));
        let local = self.h.host.st.borrow_mut().local.take();
        if let Some(l) = local {
            self.hooks.push((name, "respond"));
            self.set_local(l);
            return false;
        }
        if code == ACTION_PAUSE {
            self.hooks.push((name, "pause"));
            false
        } else {
            self.hooks.push((name, "continue"));
            true
        }
    }

    fn set_local(&mut self, l: LocalReply) {
        self.downstream = Some(l.to_message());
        self.local = Some(l);
        self.phase = Phase::Done;
        self.paused = None;
    }

    fn after_resume(&mut self) {
        let (local, continued) = {
            let mut st = self.h.host.st.borrow_mut();
            (st.local.take(), std::mem::take(&mut st.continued))
        };
        if let Some(l) = local {
            self.hooks.push(("on_callout_response", "respond"));
            self.set_local(l);
            return;
        }
        let want = if self.phase_is_request() {
            StreamType::Request
        } else {
            StreamType::Response
        };
        if self.paused.is_some() && continued.contains(&want) {
            self.hooks.push(("on_callout_response", "continue"));
            self.paused = None;
            if self.flush_pending {
                self.flush_body();
            }
            self.drive();
        }
    }

    fn phase_is_request(&self) -> bool {
        matches!(
            self.phase,
            Phase::RequestHeaders
                | Phase::RequestBody(_)
                | Phase::RequestTrailers
                | Phase::Upstream
        )
    }

    fn body_buffer(&self) -> BufferType {
        if self.phase_is_request() {
            BufferType::RequestBody
        } else {
            BufferType::ResponseBody
        }
    }

    fn flush_body(&mut self) {
        let which = self.body_buffer();
        let buf = self
            .h
            .host
            .st
            .borrow_mut()
            .buffers
            .insert(which, Vec::new())
            .unwrap_or_default();
        self.forwarded_body.extend(buf);
        self.buffering = false;
        self.flush_pending = false;
    }

    fn route(&mut self) {
        self.routed = true;
        let mut st = self.h.host.st.borrow_mut();
        let chosen = st
            .stream_props
            .get(&encode_path(props::WASP_CLUSTER))
            .cloned()
            .unwrap_or_else(|| self.h.cluster.clone().into_bytes());
        st.stream_props
            .insert(encode_path(props::CLUSTER_NAME), chosen);
        st.stream_props.insert(
            encode_path(props::ROUTE_NAME),
            self.h.route.clone().into_bytes(),
        );
    }

    /// Runs callbacks until the stream pauses, answers locally, or needs the
    /// next input (the upstream response).
    fn drive(&mut self) {
        while self.paused.is_none() && self.local.is_none() {
            if !self.routed && self.phase != Phase::RequestHeaders {
                self.route();
            }
            match self.phase {
                Phase::RequestHeaders => {
                    let eos = self.req.chunks.is_empty() && self.req.trailers.is_empty();
                    let n = self.req.headers.len();
                    let next = self.first_body_phase(true);
                    self.phase = next;
                    if !self.hook("on_request_headers", |rt, c| {
                        rt.on_request_headers(c, n, eos)
                    }) {
                        self.pause_if_running("on_request_headers");
                    }
                }
                Phase::RequestBody(i) | Phase::ResponseBody(i) => {
                    let request = matches!(self.phase, Phase::RequestBody(_));
                    let (chunks, has_trailers) = if request {
                        (&self.req.chunks, !self.req.trailers.is_empty())
                    } else {
                        let r = self.resp.as_ref();
                        (
                            r.map_or(&self.req.chunks, |r| &r.chunks),
                            r.is_some_and(|r| !r.trailers.is_empty()),
                        )
                    };
                    let chunk = chunks.get(i).cloned().unwrap_or_default();
                    let last = i + 1 >= chunks.len();
                    let eos = last && !has_trailers;
                    if request {
                        self.received_in += chunk.len();
                    }
                    let which = self.body_buffer();
                    let size = {
                        let mut st = self.h.host.st.borrow_mut();
                        let buf = st.buffers.entry(which).or_default();
                        if !self.buffering {
                            buf.clear();
                        }
                        buf.extend_from_slice(&chunk);
                        buf.len()
                    };
                    self.phase = if !last {
                        if request {
                            Phase::RequestBody(i + 1)
                        } else {
                            Phase::ResponseBody(i + 1)
                        }
                    } else if request {
                        if has_trailers {
                            Phase::RequestTrailers
                        } else {
                            Phase::Upstream
                        }
                    } else if has_trailers {
                        Phase::ResponseTrailers
                    } else {
                        Phase::Done
                    };
                    let name = if request {
                        "on_request_body"
                    } else {
                        "on_response_body"
                    };
                    let go = self.hook(name, |rt, c| {
                        if request {
                            rt.on_request_body(c, size, eos)
                        } else {
                            rt.on_response_body(c, size, eos)
                        }
                    });
                    if self.local.is_some() {
                        return;
                    }
                    if go {
                        self.flush_body();
                    } else if !eos && !last {
                        self.buffering = true; // the proxy buffers and calls again
                    } else {
                        self.flush_pending = true;
                        self.pause_if_running(name);
                    }
                }
                Phase::RequestTrailers => {
                    let n = self.req.trailers.len();
                    self.h
                        .host
                        .st
                        .borrow_mut()
                        .maps
                        .insert(MapType::RequestTrailers, self.req.trailers.clone());
                    self.phase = Phase::Upstream;
                    if !self.hook("on_request_trailers", |rt, c| rt.on_request_trailers(c, n)) {
                        self.pause_if_running("on_request_trailers");
                    }
                }
                Phase::Upstream => {
                    if self.upstream.is_none() {
                        let mut st = self.h.host.st.borrow_mut();
                        let msg = Message {
                            headers: st
                                .maps
                                .get(&MapType::RequestHeaders)
                                .cloned()
                                .unwrap_or_default(),
                            body: std::mem::take(&mut self.forwarded_body),
                            trailers: st
                                .maps
                                .get(&MapType::RequestTrailers)
                                .cloned()
                                .unwrap_or_default(),
                        };
                        st.stream_props.insert(
                            encode_path(props::UPSTREAM_ADDRESS),
                            b"127.0.0.1:8080".to_vec(),
                        );
                        self.upstream = Some(msg);
                    }
                    return; // wait for respond()
                }
                Phase::ResponseHeaders => {
                    let Some(resp) = self.resp.as_ref() else {
                        return;
                    };
                    let eos = resp.chunks.is_empty() && resp.trailers.is_empty();
                    let n = resp.headers.len() + 1;
                    let next = self.first_body_phase(false);
                    self.phase = next;
                    if !self.hook("on_response_headers", |rt, c| {
                        rt.on_response_headers(c, n, eos)
                    }) {
                        self.pause_if_running("on_response_headers");
                    }
                }
                Phase::ResponseTrailers => {
                    let Some(resp) = self.resp.as_ref() else {
                        return;
                    };
                    let trailers = resp.trailers.clone();
                    let n = trailers.len();
                    self.h
                        .host
                        .st
                        .borrow_mut()
                        .maps
                        .insert(MapType::ResponseTrailers, trailers);
                    self.phase = Phase::Done;
                    if !self.hook("on_response_trailers", |rt, c| {
                        rt.on_response_trailers(c, n)
                    }) {
                        self.pause_if_running("on_response_trailers");
                    }
                }
                Phase::Done => {
                    if self.downstream.is_none() {
                        let st = self.h.host.st.borrow();
                        self.downstream = Some(Message {
                            headers: st
                                .maps
                                .get(&MapType::ResponseHeaders)
                                .cloned()
                                .unwrap_or_default(),
                            body: std::mem::take(&mut self.forwarded_body),
                            trailers: st
                                .maps
                                .get(&MapType::ResponseTrailers)
                                .cloned()
                                .unwrap_or_default(),
                        });
                    }
                    return;
                }
            }
        }
    }

    fn pause_if_running(&mut self, at: &'static str) {
        if self.local.is_none() {
            self.paused = Some(at);
        }
    }

    fn first_body_phase(&self, request: bool) -> Phase {
        let (chunks, trailers) = if request {
            (self.req.chunks.len(), self.req.trailers.len())
        } else {
            self.resp
                .as_ref()
                .map_or((0, 0), |r| (r.chunks.len(), r.trailers.len()))
        };
        match (request, chunks > 0, trailers > 0) {
            (true, true, _) => Phase::RequestBody(0),
            (true, false, true) => Phase::RequestTrailers,
            (true, false, false) => Phase::Upstream,
            (false, true, _) => Phase::ResponseBody(0),
            (false, false, true) => Phase::ResponseTrailers,
            (false, false, false) => Phase::Done,
        }
    }
}

impl<F: Filter> Drop for Exchange<'_, F> {
    fn drop(&mut self) {
        if !self.finished && !std::thread::panicking() {
            let _ = self.finish_inner();
        }
    }
}

/// What came out of a finished stream.
#[derive(Debug, Clone)]
pub struct Completed {
    upstream: Option<Message>,
    response: Message,
    local: Option<LocalReply>,
    properties: Vec<(String, Vec<u8>)>,
    paused: Option<&'static str>,
    hooks: Vec<(&'static str, &'static str)>,
}

impl Completed {
    /// The status the client got (0 if the stream never got a response).
    pub fn status(&self) -> u16 {
        self.response.status().unwrap_or(0)
    }

    /// The response as the client got it.
    pub fn response(&self) -> &Message {
        &self.response
    }

    /// A header of the response the client got.
    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response.header(name)
    }

    /// True when the request reached the upstream.
    pub fn forwarded(&self) -> bool {
        self.upstream.is_some()
    }

    /// The request as the upstream received it. Panics, saying what happened
    /// instead, if it never got there.
    #[track_caller]
    pub fn upstream(&self) -> &Message {
        match &self.upstream {
            Some(m) => m,
            None => panic!("the request never reached the upstream: {}", self.story()),
        }
    }

    /// The filter's local response, if it sent one.
    pub fn local_response(&self) -> Option<&LocalReply> {
        self.local.as_ref()
    }

    /// Panics unless the filter answered locally with `status`.
    #[track_caller]
    pub fn assert_local_response(&self, status: u16) -> &LocalReply {
        match &self.local {
            Some(l) if l.status == status => l,
            _ => panic!("expected a local response {status}, but: {}", self.story()),
        }
    }

    /// A property the filter set during the stream (last value wins), as text.
    pub fn property(&self, name: &str) -> Option<String> {
        self.property_bytes(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// A property the filter set, raw.
    pub fn property_bytes(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every property the filter set, in order.
    pub fn properties_set(&self) -> &[(String, Vec<u8>)] {
        &self.properties
    }

    /// The hooks that ran and what each answered, e.g.
    /// `[("on_request_headers", "continue"), ...]`.
    pub fn hooks(&self) -> &[(&'static str, &'static str)] {
        &self.hooks
    }

    fn story(&self) -> String {
        let hooks: Vec<String> = self.hooks.iter().map(|(h, a)| format!("{h}→{a}")).collect();
        let end = match (&self.local, self.paused) {
            (Some(l), _) => format!(
                "the filter answered locally with {} {:?}",
                l.status,
                l.body_text()
            ),
            (None, Some(at)) => format!("the stream stayed paused in {at}"),
            (None, None) => "the stream ended".to_string(),
        };
        format!("{end} (hooks: {})", hooks.join(", "))
    }
}
