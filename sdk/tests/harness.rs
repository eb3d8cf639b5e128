//! The testing harness itself: proxy-order callbacks, body buffering, local
//! responses, callouts, metrics, shared data, timers and config errors.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use wasp_sdk::log::Level;
use wasp_sdk::metrics::{Counter, Gauge, Histogram};
use wasp_sdk::testing::{Harness, TestRequest, TestResponse};
use wasp_sdk::{
    props, shared, Action, Callout, CalloutResponse, ConfigError, Filter, LocalResponse, Log,
    NoConfig, Request, Response, Root,
};

// --- a body-rewriting filter --------------------------------------------------

struct Upper;

impl Filter for Upper {
    type Config = NoConfig;
    type State = ();
    fn configure(_: NoConfig, _: &mut Root) -> Result<(), ConfigError> {
        Ok(())
    }
    fn new(_: &Rc<()>) -> Self {
        Upper
    }
    fn on_request_body(&mut self, req: &mut Request) -> Action {
        if !req.end_of_stream() {
            return Action::Pause; // buffer the whole body
        }
        let up = req.body_text().to_uppercase();
        req.set_body(up);
        Action::Continue
    }
    fn on_response_body(&mut self, resp: &mut Response) -> Action {
        let b = resp.body_text();
        resp.set_body(format!("[{b}]"));
        Action::Continue
    }
}

#[test]
fn request_body_is_buffered_then_replaced() {
    let mut h = Harness::<Upper>::new().build();
    let done = h.run_with(
        TestRequest::new("PUT", "/x").chunks(["ab", "cd", "ef"]),
        TestResponse::ok().chunks(["1", "2"]),
    );
    assert_eq!(done.upstream().body_text(), "ABCDEF");
    // Response chunks are rewritten one by one (no Pause).
    assert_eq!(done.response().body_text(), "[1][2]");
    let hooks: Vec<_> = done
        .hooks()
        .iter()
        .map(|(h, a)| format!("{h}:{a}"))
        .collect();
    assert_eq!(
        hooks,
        [
            "on_request_headers:continue",
            "on_request_body:pause",
            "on_request_body:pause",
            "on_request_body:continue",
            "on_response_headers:continue",
            "on_response_body:continue",
            "on_response_body:continue",
        ]
    );
}

// --- local responses, properties, logs ---------------------------------------

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GateCfg {
    deny: String,
    #[serde(default)]
    reroute: Option<String>,
}

struct Gate {
    cfg: Rc<GateCfg>,
}

impl Filter for Gate {
    type Config = GateCfg;
    type State = GateCfg;
    fn configure(cfg: GateCfg, _: &mut Root) -> Result<GateCfg, ConfigError> {
        if cfg.deny.is_empty() {
            return Err(ConfigError::new("deny: must not be empty"));
        }
        Ok(cfg)
    }
    fn new(cfg: &Rc<GateCfg>) -> Self {
        Gate { cfg: cfg.clone() }
    }
    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        if req.path().as_deref() == Some(self.cfg.deny.as_str()) {
            return LocalResponse::text(403, "denied\n")
                .header("x-why", "gate")
                .into();
        }
        if let Some(c) = &self.cfg.reroute {
            req.set_cluster(c);
        }
        props::set("gate.seen", "yes").unwrap();
        Action::Continue
    }
    fn on_log(&mut self, log: &Log) {
        wasp_sdk::info!(
            "{} {} {:?} {:?} {:?}",
            log.method().unwrap_or_default(),
            log.path().unwrap_or_default(),
            log.status(),
            log.cluster(),
            log.duration()
        );
    }
}

#[test]
fn local_response_skips_upstream_and_is_logged() {
    let mut h = Harness::<Gate>::new()
        .config_json(r#"{"deny":"/x"}"#)
        .build();
    let done = h.run(TestRequest::get("/x"));
    assert!(!done.forwarded());
    let l = done.assert_local_response(403);
    assert_eq!(l.header("x-why"), Some("gate"));
    assert_eq!(done.status(), 403);
    assert_eq!(done.response().body_text(), "denied\n");
    h.assert_logged(Level::Info, "GET /x Some(403)");
}

#[test]
fn set_cluster_changes_routing_and_properties_are_recorded() {
    let mut h = Harness::<Gate>::new()
        .config_toml("deny = \"/x\"\nreroute = \"v2\"")
        .cluster("v1")
        .build();
    let done = h.run_with(
        TestRequest::get("/ok"),
        TestResponse::new(204).latency(Duration::from_millis(42)),
    );
    assert_eq!(done.status(), 204);
    assert_eq!(done.property("wasp.cluster").as_deref(), Some("v2"));
    assert_eq!(done.property("gate.seen").as_deref(), Some("yes"));
    h.assert_logged(Level::Info, "GET /ok Some(204) Some(\"v2\") Some(42ms)");
}

#[test]
fn config_errors_are_reported_with_the_message() {
    let e = Harness::<Gate>::new()
        .config_json(r#"{"deny":""}"#)
        .try_build()
        .err()
        .unwrap();
    assert_eq!(e, "deny: must not be empty");
    let e = Harness::<Gate>::new()
        .config_json(r#"{"deny":"/x","typo":1}"#)
        .try_build()
        .err()
        .unwrap();
    assert!(
        e.contains("invalid filter config") && e.contains("typo"),
        "{e}"
    );
    let e = Harness::<Gate>::new().try_build().err().unwrap();
    assert!(e.contains("deny"), "{e}");
}

#[test]
#[should_panic(
    expected = "the request never reached the upstream: the filter answered locally with 403"
)]
fn upstream_of_a_rejected_request_explains_itself() {
    let mut h = Harness::<Gate>::new()
        .config_json(r#"{"deny":"/x"}"#)
        .build();
    h.run(TestRequest::get("/x")).upstream();
}

// --- callouts -----------------------------------------------------------------

struct Authz {
    calls: Rc<Cell<u32>>,
}

impl Filter for Authz {
    type Config = NoConfig;
    type State = Cell<u32>;
    fn configure(_: NoConfig, _: &mut Root) -> Result<Cell<u32>, ConfigError> {
        Ok(Cell::new(0))
    }
    fn new(s: &Rc<Cell<u32>>) -> Self {
        Authz { calls: s.clone() }
    }
    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        let user = req.header("x-user").unwrap_or_default();
        match Callout::post("authz", "/check", user)
            .header("x-from", "test")
            .timeout(Duration::from_millis(200))
            .send()
        {
            Ok(_) => Action::Pause,
            Err(e) => LocalResponse::text(503, e.to_string()).into(),
        }
    }
    fn on_callout_response(&mut self, resp: &CalloutResponse, req: &mut Request) -> Action {
        self.calls.set(self.calls.get() + 1);
        if resp.is_failure() {
            return LocalResponse::new(504).into();
        }
        if !resp.is_success() {
            return LocalResponse::new(403).body(resp.body().to_vec()).into();
        }
        if let Some(g) = resp.header("x-group") {
            req.set_header("x-group", g);
        }
        Action::Continue
    }
}

#[test]
fn callout_resumes_the_request() {
    let mut h = Harness::<Authz>::new().known_clusters(["authz"]).build();
    let mut ex = h.request(TestRequest::get("/a").header("x-user", "ann"));
    assert!(ex.is_paused());
    assert_eq!(ex.paused_at(), Some("on_request_headers"));
    assert!(ex.upstream_request().is_none());
    let calls = ex.pending_callouts();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "authz");
    assert_eq!(calls[0].method(), "POST");
    assert_eq!(calls[0].path(), "/check");
    assert_eq!(calls[0].header(":authority"), Some("authz"));
    assert_eq!(calls[0].header("x-from"), Some("test"));
    assert_eq!(calls[0].body_text(), "ann");
    assert_eq!(calls[0].timeout, Duration::from_millis(200));
    ex.answer_callout(TestResponse::ok().header("x-group", "admins"));
    assert!(!ex.is_paused());
    assert_eq!(
        ex.upstream_request().unwrap().header("x-group"),
        Some("admins")
    );
    ex.respond(TestResponse::ok());
    assert_eq!(ex.finish().status(), 200);
}

#[test]
fn callout_rejects_or_fails_the_request() {
    let mut h = Harness::<Authz>::new().known_clusters(["authz"]).build();
    let mut ex = h.request(TestRequest::get("/a"));
    ex.answer_callout(TestResponse::new(401).body("who?"));
    let done = ex.finish();
    assert_eq!(done.status(), 403);
    assert_eq!(done.response().body_text(), "who?");

    let mut ex = h.request(TestRequest::get("/a"));
    ex.fail_callout();
    assert_eq!(ex.finish().status(), 504);
}

#[test]
fn callout_to_unknown_cluster_fails_at_send() {
    let mut h = Harness::<Authz>::new().known_clusters(["other"]).build();
    let done = h.run(TestRequest::get("/a"));
    assert_eq!(done.status(), 503);
    assert!(done.response().body_text().contains("BAD_ARGUMENT"));
}

#[test]
#[should_panic(
    expected = "paused the stream in on_request_headers waiting for callouts: [authz POST /check]"
)]
fn run_explains_a_paused_stream() {
    let mut h = Harness::<Authz>::new().build();
    h.run(TestRequest::get("/a"));
}

// --- metrics, shared data, timers ---------------------------------------------

struct Stats {
    requests: Counter,
    inflight: Gauge,
    sizes: Histogram,
    ticks: Cell<u32>,
}

struct Count(Rc<Stats>);

impl Filter for Count {
    type Config = NoConfig;
    type State = Stats;
    fn configure(_: NoConfig, root: &mut Root) -> Result<Stats, ConfigError> {
        root.set_tick_period(Duration::from_secs(1))?;
        Ok(Stats {
            requests: Counter::define("requests_total")?,
            inflight: Gauge::define("inflight")?,
            sizes: Histogram::define("body_bytes")?,
            ticks: Cell::new(0),
        })
    }
    fn new(s: &Rc<Stats>) -> Self {
        s.inflight.add(1);
        Count(s.clone())
    }
    fn on_request_headers(&mut self, _: &mut Request) -> Action {
        self.0.requests.inc();
        let _ = shared::update("seen", |old| {
            let n = old.map_or(0, |b| b[0]);
            vec![n + 1]
        });
        Action::Continue
    }
    fn on_log(&mut self, log: &Log) {
        self.0.sizes.record(log.bytes_out().unwrap_or(0));
        self.0.inflight.add(-1);
    }
    fn on_tick(s: &Rc<Stats>, _: &mut Root) {
        s.ticks.set(s.ticks.get() + 1);
        s.inflight.set(100 + u64::from(s.ticks.get()));
    }
}

#[test]
fn metrics_shared_data_and_ticks() {
    let mut h = Harness::<Count>::new().build();
    h.run_with(TestRequest::get("/"), TestResponse::ok().body("12345"));
    h.run_with(TestRequest::get("/"), TestResponse::ok().body("1"));
    assert_eq!(h.counter("requests_total"), 2);
    assert_eq!(h.gauge("inflight"), 0);
    assert_eq!(h.histogram("body_bytes"), vec![5, 1]);
    assert_eq!(h.shared("seen"), Some(vec![2]));

    assert_eq!(h.tick_period(), Some(Duration::from_secs(1)));
    h.advance(Duration::from_millis(3500));
    assert_eq!(h.gauge("inflight"), 103);
}

#[test]
#[should_panic(
    expected = "no counter named \"nope\"; defined metrics:\n  requests_total\n  inflight\n  body_bytes"
)]
fn missing_metric_lists_defined_ones() {
    let h = Harness::<Count>::new().build();
    h.counter("nope");
}

#[test]
fn shared_data_cas() {
    let h = Harness::<Count>::new().build();
    drop(h);
    // Outside a harness the no-op host accepts writes.
    shared::set("k", b"v", None).unwrap();
}

#[test]
fn shared_cas_mismatch_is_reported() {
    struct Cas;
    impl Filter for Cas {
        type Config = NoConfig;
        type State = ();
        fn configure(_: NoConfig, _: &mut Root) -> Result<(), ConfigError> {
            shared::set("k", b"1", None).map_err(|e| e.to_string())?;
            let (_, cas) = shared::get("k")?.ok_or("missing")?;
            shared::set("k", b"2", Some(cas)).map_err(|e| e.to_string())?;
            match shared::set("k", b"3", Some(cas)) {
                Err(shared::SharedError::CasMismatch) => Ok(()),
                other => Err(format!("expected CAS mismatch, got {other:?}").into()),
            }
        }
        fn new(_: &Rc<()>) -> Self {
            Cas
        }
    }
    let h = Harness::<Cas>::new().build();
    assert_eq!(h.shared("k"), Some(b"2".to_vec()));
}

// --- request/response trailers and header ops ---------------------------------

struct Trail;

impl Filter for Trail {
    type Config = NoConfig;
    type State = ();
    fn configure(_: NoConfig, _: &mut Root) -> Result<(), ConfigError> {
        Ok(())
    }
    fn new(_: &Rc<()>) -> Self {
        Trail
    }
    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        assert!(!req.end_of_stream());
        req.add_header("via", "a");
        req.add_header("via", "b");
        req.remove_header("x-secret");
        assert_eq!(req.headers().get_all("via"), ["a", "b"]);
        Action::Continue
    }
    fn on_request_trailers(&mut self, req: &mut Request) -> Action {
        req.trailers().set("x-checksum", "ok");
        Action::Continue
    }
    fn on_response_headers(&mut self, resp: &mut Response) -> Action {
        if resp.status() == Some(500) {
            resp.set_status(502);
        }
        Action::Continue
    }
    fn on_response_trailers(&mut self, resp: &mut Response) -> Action {
        resp.trailers().add("x-done", "1");
        Action::Continue
    }
}

#[test]
fn trailers_and_header_ops() {
    let mut h = Harness::<Trail>::new().build();
    let done = h.run_with(
        TestRequest::get("/")
            .header("x-secret", "s")
            .trailer("x-checksum", "bad"),
        TestResponse::new(500).trailer("grpc-status", "0"),
    );
    let up = done.upstream();
    assert_eq!(up.header_all("via"), ["a", "b"]);
    assert_eq!(up.header("x-secret"), None);
    assert_eq!(up.trailer("x-checksum"), Some("ok"));
    assert_eq!(done.status(), 502);
    assert_eq!(done.response().trailer("x-done"), Some("1"));
    assert_eq!(done.response().trailer("grpc-status"), Some("0"));
}

// --- root callouts from a timer -------------------------------------------------

struct Refresher(Rc<std::cell::RefCell<String>>);

impl Filter for Refresher {
    type Config = NoConfig;
    type State = std::cell::RefCell<String>;
    fn configure(_: NoConfig, root: &mut Root) -> Result<Self::State, ConfigError> {
        root.set_tick_period(Duration::from_secs(10))?;
        Ok(std::cell::RefCell::new("none".into()))
    }
    fn new(s: &Rc<Self::State>) -> Self {
        Refresher(s.clone())
    }
    fn on_tick(_: &Rc<Self::State>, _: &mut Root) {
        if let Err(e) = Callout::get("policy", "/v1/policy").send() {
            wasp_sdk::warn!("refresh failed: {e}");
        }
    }
    fn on_root_callout_response(s: &Rc<Self::State>, _: &mut Root, resp: &CalloutResponse) {
        if resp.is_success() {
            *s.borrow_mut() = resp.body_text();
        }
    }
    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        req.set_header("x-policy", &self.0.borrow());
        Action::Continue
    }
}

#[test]
fn timer_driven_root_callouts_update_shared_state() {
    let mut h = Harness::<Refresher>::new()
        .known_clusters(["policy"])
        .build();
    assert_eq!(
        h.run(TestRequest::get("/")).upstream().header("x-policy"),
        Some("none")
    );
    h.advance(Duration::from_secs(9));
    assert!(h.pending_callouts().is_empty(), "no tick before the period");
    h.advance(Duration::from_secs(1));
    let call = h.answer_callout(TestResponse::ok().body("v7"));
    assert_eq!(call.path(), "/v1/policy");
    assert_eq!(
        h.run(TestRequest::get("/")).upstream().header("x-policy"),
        Some("v7")
    );
    // A failed refresh keeps the old value.
    h.tick();
    h.answer_callout(TestResponse::new(500));
    assert_eq!(
        h.run(TestRequest::get("/")).upstream().header("x-policy"),
        Some("v7")
    );
}
