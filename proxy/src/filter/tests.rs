//! In-process tests of the engine against the compatibility fixtures in
//! `tests/wasm/` (built with the community `proxy-wasm` crate for both
//! guest targets by `scripts/build-wasm.sh`). Each test drives real
//! `http` types through `FilterSet` / `StreamFilters` on a current-thread
//! runtime, as a worker does, for both targets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};

use super::*;

const TARGETS: [&str; 2] = ["wasm32-wasip1", "wasm32-unknown-unknown"];

fn fixture(target: &str, name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm-fixtures")
        .join(target)
        .join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "missing wasm fixture {}: run scripts/build-wasm.sh first",
        p.display()
    );
    p
}

/// Canned callouts: cluster `authz` allows `x-user: alice` (200, body
/// `ok:alice`) and denies anyone else (403); `slow` never answers.
struct Canned;

impl HttpCallouts for Canned {
    fn call(
        &self,
        cluster: &str,
        req: Request<Bytes>,
        _timeout: Duration,
    ) -> Option<CalloutFuture> {
        match cluster {
            "authz" => Some(Box::pin(async move {
                assert_eq!(req.uri().path(), "/check");
                let user = req
                    .headers()
                    .get("x-user")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                tokio::task::yield_now().await;
                let status = if user == "alice" { 200 } else { 403 };
                Ok(Response::builder()
                    .status(status)
                    .header("x-from", "authz")
                    .body(Bytes::from(format!("ok:{user}")))
                    .unwrap())
            })),
            "slow" => Some(Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err("never".to_string())
            })),
            _ => None,
        }
    }
}

fn runtime() -> Arc<FilterRuntime> {
    static RT: OnceLock<Arc<FilterRuntime>> = OnceLock::new();
    RT.get_or_init(|| {
        let cache =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/.cache");
        FilterRuntime::new(Some(cache), Arc::new(Canned)).unwrap()
    })
    .clone()
}

fn spec(target: &str, fixture_name: &str, name: &str) -> FilterSpec {
    FilterSpec::new(name, fixture(target, fixture_name))
}

fn load(specs: Vec<FilterSpec>) -> Arc<FilterSet> {
    runtime().load(specs).unwrap()
}

fn info() -> StreamInfo {
    StreamInfo {
        listener: Arc::from("inbound"),
        source: "10.0.0.1:1234".parse::<SocketAddr>().unwrap(),
        destination: "10.0.0.2:15006".parse::<SocketAddr>().unwrap(),
        scheme: "http",
        protocol: "HTTP/1.1",
        request_id: Arc::from("req-1"),
        start: SystemTime::now(),
        principal: None,
        tls: None,
    }
}

fn pipeline(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

fn request(path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn hdr<'a>(h: &'a http::HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

#[track_caller]
fn expect_respond(v: Verdict) -> Response<Bytes> {
    match v {
        Verdict::Respond(r) => r,
        Verdict::Continue => panic!("expected a local response, got Continue"),
        Verdict::Wait => panic!("expected a local response, got Wait"),
    }
}

#[track_caller]
fn expect_continue(v: Verdict) {
    if let Verdict::Respond(r) = v {
        panic!("expected Continue, got {} {:?}", r.status(), r.body());
    }
}

/// Runs a request (headers only) and a 200 response through `set`.
async fn exchange(
    set: &Arc<FilterSet>,
    names: &[&str],
    path: &str,
) -> Result<(http::request::Parts, http::response::Parts), Response<Bytes>> {
    let mut s = set.stream(&pipeline(names), info());
    let mut req = request(path, &[]);
    if let Verdict::Respond(r) = s.request_headers(&mut req, true).await {
        return Err(r);
    }
    let mut resp = response(200, &[]);
    if let Verdict::Respond(r) = s.response_headers(&mut resp, true).await {
        return Err(r);
    }
    s.finish(0, 0);
    Ok((req, resp))
}

#[test]
fn stream_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FilterRuntime>();
    assert_send_sync::<FilterSet>();
    fn assert_send_type<T: Send>() {}
    assert_send_type::<StreamFilters>();
    let rt = FilterRuntime::new(None, Arc::new(Canned)).unwrap();
    let set = rt.load(vec![]).unwrap();
    let mut s = set.stream(&[], info());
    let mut req = request("/", &[]);
    let fut = s.request_headers(&mut req, true);
    assert_send(&fut);
}

#[tokio::test]
async fn empty_pipeline_is_a_no_op() {
    let set = load(vec![]);
    let mut s = set.stream(&[], info());
    assert!(s.is_empty());
    let mut req = request("/", &[("a", "b")]);
    expect_continue(s.request_headers(&mut req, false).await);
    assert_eq!(hdr(&req.headers, "a"), Some("b"));
    match s.request_body(Bytes::from_static(b"x"), true) {
        BodyVerdict::Forward(b) => assert_eq!(&b[..], b"x"),
        other => panic!("{other:?}"),
    }
    s.finish(1, 0);
}

#[tokio::test]
async fn headers_add_remove_replace_both_sides() {
    for t in TARGETS {
        let mut sp = spec(t, "headers", "headers");
        sp.config = Bytes::from_static(
            br#"{"request":{"add":{"x-a":"1"},"replace":{"x-r":"new"},"remove":["x-gone"]},
                "response":{"add":{"x-ra":"2"},"replace":{"server":"wasp"},"remove":["x-secret"]}}"#,
        );
        let set = load(vec![sp]);
        let mut s = set.stream(&pipeline(&["headers"]), info());
        let mut req = request("/p?q=1", &[("x-r", "old"), ("x-gone", "y")]);
        expect_continue(s.request_headers(&mut req, true).await);
        assert_eq!(hdr(&req.headers, "x-a"), Some("1"), "{t}");
        assert_eq!(hdr(&req.headers, "x-r"), Some("new"), "{t}");
        assert_eq!(hdr(&req.headers, "x-gone"), None, "{t}");
        assert_eq!(hdr(&req.headers, "x-seen-path"), Some("/p?q=1"), "{t}");
        assert_eq!(hdr(&req.headers, "x-seen-method"), Some("GET"), "{t}");
        assert_eq!(hdr(&req.headers, "host"), Some("example.com"), "{t}");

        let mut resp = response(200, &[("x-secret", "s"), ("server", "upstream")]);
        expect_continue(s.response_headers(&mut resp, false).await);
        assert_eq!(hdr(&resp.headers, "x-ra"), Some("2"), "{t}");
        assert_eq!(hdr(&resp.headers, "server"), Some("wasp"), "{t}");
        assert_eq!(hdr(&resp.headers, "x-secret"), None, "{t}");
        assert_eq!(hdr(&resp.headers, "x-seen-status"), Some("200"), "{t}");
        s.finish(0, 0);
    }
}

#[tokio::test]
async fn headers_rejects_bad_json_config() {
    for t in TARGETS {
        let mut sp = spec(t, "headers", "headers-bad");
        sp.config = Bytes::from_static(b"{not json");
        let err = runtime().load(vec![sp]).unwrap_err().to_string();
        assert!(
            err.contains("filter \"headers-bad\": proxy_on_configure returned false"),
            "{t}: {err}"
        );
    }
}

#[tokio::test]
async fn local_reply_short_circuits() {
    for t in TARGETS {
        let set = load(vec![spec(t, "local-reply", "local")]);
        let mut s = set.stream(&pipeline(&["local"]), info());
        let mut req = request("/deny/me", &[]);
        let r = expect_respond(s.request_headers(&mut req, true).await);
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
        assert_eq!(hdr(r.headers(), "x-local"), Some("1"), "{t}");
        assert_eq!(&r.body()[..], b"denied by filter\n", "{t}");
        s.finish(0, 0);

        let mut s = set.stream(&pipeline(&["local"]), info());
        let mut req = request("/fine", &[]);
        expect_continue(s.request_headers(&mut req, true).await);
    }
}

#[tokio::test]
async fn body_is_buffered_and_rewritten_both_ways() {
    for t in TARGETS {
        let set = load(vec![spec(t, "body-rewrite", "body")]);
        let mut s = set.stream(&pipeline(&["body"]), info());
        let mut req = request("/upload", &[("content-length", "8")]);
        expect_continue(s.request_headers(&mut req, false).await);
        assert_eq!(hdr(&req.headers, "content-length"), None, "{t}");
        assert!(matches!(
            s.request_body(Bytes::from_static(b"xxfo"), false),
            BodyVerdict::Hold
        ));
        match s.request_body(Bytes::from_static(b"o yy"), true) {
            BodyVerdict::Forward(b) => assert_eq!(&b[..], b"xxbar yy", "{t}"),
            other => panic!("{t}: {other:?}"),
        }
        let mut resp = response(200, &[("content-length", "11")]);
        expect_continue(s.response_headers(&mut resp, false).await);
        assert_eq!(hdr(&resp.headers, "content-length"), None, "{t}");
        assert!(matches!(
            s.response_body(Bytes::from_static(b"hello "), false),
            BodyVerdict::Hold
        ));
        match s.response_body(Bytes::from_static(b"world"), true) {
            BodyVerdict::Forward(b) => assert_eq!(&b[..], b"hello wasm", "{t}"),
            other => panic!("{t}: {other:?}"),
        }
        s.finish(8, 10);
    }
}

#[tokio::test]
async fn buffered_body_over_the_cap_is_413() {
    for t in TARGETS {
        let mut sp = spec(t, "body-rewrite", "body-small");
        sp.max_body_bytes = 8;
        let set = load(vec![sp]);
        let mut s = set.stream(&pipeline(&["body-small"]), info());
        let mut req = request("/upload", &[]);
        expect_continue(s.request_headers(&mut req, false).await);
        assert!(matches!(
            s.request_body(Bytes::from_static(b"12345"), false),
            BodyVerdict::Hold
        ));
        match s.request_body(Bytes::from_static(b"67890"), false) {
            BodyVerdict::Respond(r) => {
                assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{t}");
                assert_eq!(hdr(r.headers(), "x-wasp-error"), Some("body_too_large"));
            }
            other => panic!("{t}: {other:?}"),
        }
    }
}

/// `redact` under `name`, configured with `words` (see the fixture).
fn redact(t: &str, name: &str, words: &'static str) -> FilterSpec {
    let mut sp = spec(t, "redact", name);
    sp.config = Bytes::from_static(words.as_bytes());
    sp
}

/// Every chunk runs through the filters before one that paused to buffer,
/// in both directions: an inspector (`redact`, streaming) first, then a
/// filter that buffers and lets go every other chunk, then one that
/// buffers to the end. Two buffers are held at once (chunk 3 at the
/// second filter while chunks 1-2 wait at the third); what leaves is in
/// order, and the inspector saw every chunk.
#[tokio::test]
async fn every_chunk_passes_the_filters_before_a_buffering_one() {
    for t in TARGETS {
        let set = load(vec![
            redact(t, "inspect", "grow stream"),
            redact(t, "alternate", "every-other"),
            redact(t, "hold", "hold"),
        ]);
        let chunks: [&'static [u8]; 4] = [b"1 ", b"secret ", b"3 ", b"secret"];
        let want = "1 [REDACTED] 3 [REDACTED]";

        let mut s = set.stream(&pipeline(&["inspect", "alternate", "hold"]), info());
        let mut req = request("/upload", &[]);
        expect_continue(s.request_headers(&mut req, false).await);
        for c in &chunks[..3] {
            let v = s.request_body(Bytes::from_static(c), false);
            assert!(matches!(v, BodyVerdict::Hold), "{t}: {v:?}");
        }
        match s.request_body(Bytes::from_static(chunks[3]), true) {
            BodyVerdict::Forward(b) => assert_eq!(String::from_utf8_lossy(&b), want, "{t}"),
            other => panic!("{t}: {other:?}"),
        }
        drop(s);

        // A response runs the chain in reverse: the same filters listed
        // the other way round.
        let mut s = set.stream(&pipeline(&["hold", "alternate", "inspect"]), info());
        let mut req = request("/", &[]);
        expect_continue(s.request_headers(&mut req, true).await);
        let mut resp = response(200, &[]);
        expect_continue(s.response_headers(&mut resp, false).await);
        for c in &chunks[..3] {
            let v = s.response_body(Bytes::from_static(c), false);
            assert!(matches!(v, BodyVerdict::Hold), "{t}: {v:?}");
        }
        match s.response_body(Bytes::from_static(chunks[3]), true) {
            BodyVerdict::Forward(b) => assert_eq!(String::from_utf8_lossy(&b), want, "{t}"),
            other => panic!("{t}: {other:?}"),
        }
    }
}

/// Each filter's limit applies to its own buffer: a small limit on the
/// filter that lets go every other chunk is never reached (it never holds
/// more than two chunks), while the filter holding to the end refuses the
/// body once its own buffer passes its limit (413 for a request, 500 for a
/// response).
#[tokio::test]
async fn each_buffering_filter_has_its_own_limit() {
    for t in TARGETS {
        let mut alt = redact(t, "alternate-small", "every-other");
        alt.max_body_bytes = 8;
        let mut hold = redact(t, "hold-small", "hold");
        hold.max_body_bytes = 12;
        let set = load(vec![alt, hold]);
        for dir in [Dir::Request, Dir::Response] {
            let names: &[&str] = match dir {
                Dir::Request => &["alternate-small", "hold-small"],
                Dir::Response => &["hold-small", "alternate-small"],
            };
            let mut s = set.stream(&pipeline(names), info());
            let mut req = request("/upload", &[]);
            expect_continue(s.request_headers(&mut req, dir == Dir::Response).await);
            if dir == Dir::Response {
                let mut resp = response(200, &[]);
                expect_continue(s.response_headers(&mut resp, false).await);
            }
            let mut body = |c: &'static [u8]| match dir {
                Dir::Request => s.request_body(Bytes::from_static(c), false),
                Dir::Response => s.response_body(Bytes::from_static(c), false),
            };
            // 4 + 4 at `alternate` (its limit), then 8 at `hold`; 4 more.
            for c in [b"aaaa", b"bbbb", b"cccc"] {
                let v = body(c);
                assert!(matches!(v, BodyVerdict::Hold), "{t} {dir:?}: {v:?}");
            }
            // `alternate` lets "ccccdddd" go: 16 bytes for `hold`, over 12.
            match body(b"dddd") {
                BodyVerdict::Respond(r) => {
                    let (status, code) = match dir {
                        Dir::Request => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
                        Dir::Response => (StatusCode::INTERNAL_SERVER_ERROR, "response_too_large"),
                    };
                    assert_eq!(r.status(), status, "{t} {dir:?}");
                    assert_eq!(hdr(r.headers(), "x-wasp-error"), Some(code), "{t} {dir:?}");
                    let body = String::from_utf8_lossy(r.body());
                    assert!(body.contains("hold-small"), "{t} {dir:?}: {body}");
                }
                other => panic!("{t} {dir:?}: {other:?}"),
            }
        }
    }
}

/// Network filters: a client chunk sent while a later filter buffers
/// still passes the filters before it. `tcp-rewrite` as `redact` (masks
/// `secret`) then as `line` (holds until a newline): chunks 2 and 3 must
/// be masked by the first filter before they join the second one's buffer,
/// and what leaves is the whole line in order. With `max_body_bytes` on
/// `line` its own buffer is capped; `redact`, holding nothing, is not.
#[tokio::test]
async fn every_tcp_chunk_passes_the_network_filters_before_a_buffering_one() {
    use super::network::{NetVerdict, Side};
    for t in TARGETS {
        let mut redact = spec(t, "tcp-rewrite", "redact");
        redact.config = Bytes::from_static(b"redact");
        redact.max_body_bytes = 6;
        let mut line = spec(t, "tcp-rewrite", "line");
        line.config = Bytes::from_static(b"line");
        line.max_body_bytes = 24;
        let set = load(vec![redact, line]);

        let mut c = set.network(&pipeline(&["redact", "line"]), info());
        assert!(!c.new_connection().await.unwrap_or(true), "{t}");
        for chunk in [&b"user "[..], b"secret ", b"x secret"] {
            let v = c.data(Side::Downstream, chunk, false);
            assert_eq!(v, NetVerdict::Hold, "{t}");
        }
        match c.data(Side::Downstream, b"\n", false) {
            NetVerdict::Forward(b) => {
                assert_eq!(String::from_utf8_lossy(&b), "user ****** x ******\n", "{t}")
            }
            other => panic!("{t}: {other:?}"),
        }
        // The same bytes one more time: 21 held, then 5 more is over
        // `line`'s 24.
        for chunk in [&b"user "[..], b"secret ", b"x secret"] {
            assert_eq!(
                c.data(Side::Downstream, chunk, false),
                NetVerdict::Hold,
                "{t}"
            );
        }
        match c.data(Side::Downstream, b"more\n", false) {
            NetVerdict::Close(why) => assert!(why.why.contains("\"line\""), "{t}: {why:?}"),
            other => panic!("{t}: {other:?}"),
        }
        c.finish();
    }
}

#[tokio::test]
async fn callout_pauses_then_allows_or_denies() {
    for t in TARGETS {
        let set = load(vec![spec(t, "callout", "authz-filter")]);
        let mut s = set.stream(&pipeline(&["authz-filter"]), info());
        let mut req = request("/x", &[("x-user", "alice")]);
        expect_continue(s.request_headers(&mut req, true).await);
        assert_eq!(hdr(&req.headers, "x-authz"), Some("ok:alice"), "{t}");
        s.finish(0, 0);

        let mut s = set.stream(&pipeline(&["authz-filter"]), info());
        let mut req = request("/x", &[("x-user", "bob")]);
        let r = expect_respond(s.request_headers(&mut req, true).await);
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
        assert_eq!(hdr(r.headers(), "x-authz-status"), Some("403"), "{t}");
        assert_eq!(&r.body()[..], b"denied by authz\n");
    }
}

#[tokio::test]
async fn callout_to_unknown_cluster_is_bad_argument_not_a_trap() {
    for t in TARGETS {
        let mut sp = spec(t, "callout", "authz-unknown");
        sp.config = Bytes::from_static(b"no-such-cluster");
        let set = load(vec![sp]);
        let mut s = set.stream(&pipeline(&["authz-unknown"]), info());
        let mut req = request("/x", &[]);
        let r = expect_respond(s.request_headers(&mut req, true).await);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "{t}");
        assert_eq!(
            hdr(r.headers(), "x-callout-error"),
            Some("BadArgument"),
            "{t}"
        );
    }
}

#[tokio::test]
async fn callout_timeout_answers_the_guest() {
    for t in TARGETS {
        let mut sp = spec(t, "callout", "authz-slow");
        sp.config = Bytes::from_static(b"slow");
        let set = load(vec![sp]);
        let mut s = set.stream(&pipeline(&["authz-slow"]), info());
        let mut req = request("/x", &[("x-user", "alice")]);
        let started = Instant::now();
        // The fixture asks with a 2 s timeout; the failed answer has no :status.
        let r = expect_respond(s.request_headers(&mut req, true).await);
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[tokio::test]
async fn timer_ticks_on_the_worker() {
    for t in TARGETS {
        let name = format!("timer-{t}");
        let mut sp = spec(t, "timer", &name);
        // The fixture ticks every 10 ms: under the default floor (100 ms).
        sp.tick_min = Duration::from_millis(10);
        let set = load(vec![sp]);
        // The first stream creates this worker's VM, which starts ticking.
        let _ = exchange(&set, &[&name], "/").await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, resp) = exchange(&set, &[&name], "/").await.unwrap();
        let ticks: u64 = hdr(&resp.headers, "x-ticks").unwrap().parse().unwrap();
        assert!(ticks >= 3, "{t}: only {ticks} ticks in 150ms");
    }
}

#[tokio::test]
async fn shared_data_cas_across_workers() {
    for t in TARGETS {
        let name = format!("shared-{t}");
        let set = load(vec![spec(t, "shared-data", &name)]);
        for i in 1..=3u32 {
            let (_, resp) = exchange(&set, &[&name], "/").await.unwrap();
            assert_eq!(
                hdr(&resp.headers, "x-counter"),
                Some(&*i.to_string()),
                "{t}"
            );
            assert_eq!(hdr(&resp.headers, "x-cas-conflict"), Some("1"), "{t}");
        }
        // Another worker thread: its own VM, the same shared data.
        let set2 = set.clone();
        let name2 = name.clone();
        let counter = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (_, resp) = exchange(&set2, &[&name2], "/").await.unwrap();
                hdr(&resp.headers, "x-counter").map(String::from)
            })
        })
        .join()
        .unwrap();
        assert_eq!(counter.as_deref(), Some("4"), "{t}");
    }
}

#[tokio::test]
async fn guest_metrics_are_exported() {
    for t in TARGETS {
        let name = format!("metrics-{t}");
        let set = load(vec![spec(t, "metrics", &name)]);
        let mut last = None;
        for _ in 0..3 {
            let (_, resp) = exchange(&set, &[&name], "/abc").await.unwrap();
            last = hdr(&resp.headers, "x-requests").map(String::from);
        }
        assert_eq!(last.as_deref(), Some("3"), "{t}");
        let mut out = String::new();
        runtime().render_metrics(&mut out);
        let f = format!("filter=\"{name}\"");
        assert!(
            out.contains("# TYPE fixture_requests_total counter"),
            "{out}"
        );
        assert!(
            out.contains(&format!("fixture_requests_total{{{f}}} 3")),
            "{out}"
        );
        assert!(out.contains("# TYPE fixture_last_path_len gauge"), "{out}");
        assert!(
            out.contains(&format!("fixture_last_path_len{{{f}}} 4")),
            "{out}"
        );
        assert!(out.contains("# TYPE fixture_answer histogram"), "{out}");
        assert!(
            out.contains(&format!("fixture_answer_count{{{f}}} 3")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "wasp_filter_calls_total{{{f},phase=\"request_headers\"}} 3"
            )),
            "{out}"
        );
        assert!(out.contains("# TYPE wasp_filter_callback_duration_seconds histogram"));
    }
}

#[tokio::test]
async fn properties_and_not_found() {
    for t in TARGETS {
        let set = load(vec![spec(t, "properties", "props")]);
        let mut s = set.stream(&pipeline(&["props"]), info());
        let mut req = request("/a/b?x=1", &[]);
        expect_continue(s.request_headers(&mut req, true).await);
        assert!(hdr(&req.headers, "x-headers-map-len").is_some(), "{t}");
        assert_eq!(
            s.property("wasp.cluster").as_deref(),
            Some(&b"reviews-v2"[..]),
            "{t}"
        );
        s.set_route(Arc::from("r1"), Arc::from("c1"));
        s.set_upstream("127.0.0.1:9000".parse().unwrap());
        let mut resp = response(201, &[]);
        expect_continue(s.response_headers(&mut resp, true).await);
        let h = &resp.headers;
        let expect = [
            ("x-missing", "true/true"),
            ("x-prop-request.path", "/a/b?x=1"),
            ("x-prop-request.url_path", "/a/b"),
            ("x-prop-request.host", "example.com"),
            ("x-prop-request.scheme", "http"),
            ("x-prop-request.method", "GET"),
            ("x-prop-request.id", "req-1"),
            ("x-prop-request.protocol", "HTTP/1.1"),
            ("x-prop-source.address", "10.0.0.1:1234"),
            ("x-prop-source.port", "1234"),
            ("x-prop-destination.address", "10.0.0.2:15006"),
            ("x-prop-destination.port", "15006"),
            ("x-prop-response.code", "201"),
            ("x-prop-plugin_name", "props"),
            ("x-prop-plugin_root_id", "props"),
            ("x-prop-listener_name", "inbound"),
            ("x-prop-route_name", "r1"),
            ("x-prop-cluster_name", "c1"),
            ("x-prop-upstream.address", "127.0.0.1:9000"),
            ("x-prop-fixture.note", "hello"),
            ("x-prop-wasp.cluster", "reviews-v2"),
        ];
        for (k, v) in expect {
            assert_eq!(hdr(h, k), Some(v), "{t}: {k}");
        }
        let time: i64 = hdr(h, "x-prop-request.time").unwrap().parse().unwrap();
        assert!(time > 1_600_000_000_000_000_000, "{t}: {time}");
        s.finish(0, 0);
    }
}

#[tokio::test]
async fn chain_order_is_forward_then_reverse() {
    for t in TARGETS {
        let mk = |n: &str| {
            let mut sp = spec(t, "order", n);
            sp.config = Bytes::from(n.to_string());
            sp
        };
        let set = load(vec![mk("a"), mk("b"), mk("c")]);
        let (req, resp) = exchange(&set, &["a", "b", "c"], "/").await.unwrap();
        assert_eq!(hdr(&req.headers, "x-order"), Some("abc"), "{t}");
        assert_eq!(hdr(&resp.headers, "x-order"), Some("cba"), "{t}");
    }
}

#[tokio::test]
async fn infinite_loop_hits_the_deadline_and_the_vm_is_rebuilt() {
    for t in TARGETS {
        let name = format!("loop-{t}");
        let mut sp = spec(t, "loop", &name);
        sp.cpu_limit = Duration::from_millis(20);
        let set = load(vec![sp]);
        let started = Instant::now();
        let r = exchange(&set, &[&name], "/loop").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{t}");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{t}");
        assert_eq!(
            hdr(r.headers(), "x-wasp-error"),
            Some("filter_failed"),
            "{t}"
        );
        let body = String::from_utf8_lossy(r.body()).into_owned();
        assert!(
            body.contains(&name) && body.contains("deadline"),
            "{t}: {body}"
        );
        // The next request gets a fresh VM.
        exchange(&set, &[&name], "/ok").await.unwrap();
        let stats = runtime().stats_of(&name).unwrap();
        assert!(stats.calls(metrics::Phase::RequestHeaders) >= 2);
        let mut out = String::new();
        runtime().render_metrics(&mut out);
        assert!(
            out.contains(&format!(
                "wasp_filter_timeouts_total{{filter=\"{name}\",phase=\"request_headers\"}} 1"
            )),
            "{out}"
        );
    }
}

#[tokio::test]
async fn fail_open_skips_the_failed_filter() {
    for t in TARGETS {
        let mut sp = spec(t, "loop", "loop-open");
        sp.cpu_limit = Duration::from_millis(10);
        sp.fail = FailPolicy::Open;
        let mut hs = spec(t, "headers", "headers-after-loop");
        hs.config = Bytes::from_static(br#"{"request":{"add":{"x-after":"1"}}}"#);
        let set = load(vec![sp, hs]);
        let (req, _) = exchange(&set, &["loop-open", "headers-after-loop"], "/loop")
            .await
            .unwrap();
        assert_eq!(hdr(&req.headers, "x-after"), Some("1"), "{t}");
    }
}

#[tokio::test]
async fn memory_bomb_is_capped() {
    for t in TARGETS {
        let name = format!("bomb-{t}");
        let mut sp = spec(t, "membomb", &name);
        sp.memory_limit = 8 << 20;
        sp.cpu_limit = Duration::from_secs(2);
        let set = load(vec![sp]);
        let r = exchange(&set, &[&name], "/bomb").await.unwrap_err();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{t}");
        let body = String::from_utf8_lossy(r.body()).into_owned();
        assert!(body.contains("memory limit"), "{t}: {body}");
        exchange(&set, &[&name], "/ok").await.unwrap();
    }
}

#[tokio::test]
async fn trap_every_tenth_fails_only_those_requests() {
    for t in TARGETS {
        let name = format!("trap10-{t}");
        let set = load(vec![spec(t, "trap-every-10th", &name)]);
        let mut failed = Vec::new();
        for i in 1..=25 {
            match exchange(&set, &[&name], "/").await {
                Ok((req, _)) => assert!(hdr(&req.headers, "x-seen").is_some()),
                Err(r) => {
                    assert_eq!(hdr(r.headers(), "x-wasp-error"), Some("filter_failed"));
                    failed.push(i);
                }
            }
        }
        // The VM is rebuilt after each trap, so its counter restarts.
        assert_eq!(failed, vec![10, 20], "{t}");
        let status = runtime().status_json();
        let entry = status
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name.as_str())
            .unwrap()
            .clone();
        assert_eq!(entry["state"], "ok", "{t}: {entry}");
        assert!(
            entry["last_error"].as_str().unwrap().contains("trap"),
            "{entry}"
        );
    }
}

#[tokio::test]
async fn proc_exit_fails_the_vm_not_the_proxy() {
    for t in TARGETS {
        let name = format!("exit-{t}");
        let set = load(vec![spec(t, "proc-exit", &name)]);
        let r = exchange(&set, &[&name], "/exit").await.unwrap_err();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{t}");
        let body = String::from_utf8_lossy(r.body()).into_owned();
        if t == "wasm32-wasip1" {
            assert!(body.contains("proc_exit(3)"), "{t}: {body}");
        }
        exchange(&set, &[&name], "/ok").await.unwrap();
    }
}

#[tokio::test]
async fn configure_false_rejects_the_filter_by_name() {
    for t in TARGETS {
        let err = runtime()
            .load(vec![spec(t, "configure-false", "cf")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err, "filter \"cf\": proxy_on_configure returned false",
            "{t}"
        );
    }
    let status = runtime().status_json();
    let cf = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "cf")
        .unwrap();
    assert_eq!(cf["state"], "failed");
}

/// A set prepared but not published (a reload that fails after its filters
/// loaded: the snapshot, a listener) leaves the registry as it was: the
/// serving version, its generation and module, as `/filters` shows them.
/// Only publishing names the new version.
#[tokio::test]
async fn a_prepared_set_changes_nothing_until_published() {
    let t = "wasm32-wasip1";
    let entry = |name: &str| {
        runtime()
            .status_json()
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| {
                serde_json::json!({
                    "sha256": e["sha256"],
                    "generation": e["generation"],
                    "module": e["module"],
                    "state": e["state"],
                })
            })
            .unwrap()
    };
    let serving = load(vec![spec(t, "noop", "staged")]);
    let before = entry("staged");
    assert_eq!(before["state"], "ok", "{before}");

    let staged = runtime()
        .prepare_set(vec![spec(t, "headers", "staged")])
        .unwrap();
    assert_eq!(entry("staged"), before, "prepared, not published");
    drop(staged);
    assert_eq!(entry("staged"), before, "dropped unpublished");
    assert_eq!(serving.plugins.len(), 1);

    let next = runtime()
        .prepare_set(vec![spec(t, "headers", "staged")])
        .unwrap()
        .publish();
    let after = entry("staged");
    assert_ne!(after["sha256"], before["sha256"], "{after}");
    assert!(
        after["generation"].as_u64() > before["generation"].as_u64(),
        "{after}"
    );
    drop((serving, next));
}

#[tokio::test]
async fn non_proxy_wasm_modules_are_rejected() {
    let dir = std::env::temp_dir().join(format!("wasp-filter-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.wasm");
    std::fs::write(&empty, b"\0asm\x01\0\0\0").unwrap();
    let err = runtime()
        .load(vec![FilterSpec::new("empty", &empty)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("filter \"empty\"") && err.contains("proxy_abi_version"),
        "{err}"
    );
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    let err = runtime()
        .load(vec![FilterSpec::new("junk", &junk)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("filter \"junk\": compile error"), "{err}");
    let err = runtime()
        .load(vec![FilterSpec::new("gone", dir.join("missing.wasm"))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("filter \"gone\": reading"), "{err}");
}

#[tokio::test]
async fn reload_bumps_generation_and_old_streams_finish() {
    let t = TARGETS[0];
    let name = "reloaded";
    let mut sp = spec(t, "order", name);
    sp.config = Bytes::from_static(b"1");
    let gen1 = load(vec![sp.clone()]);
    let mut old = gen1.stream(&pipeline(&[name]), info());
    let mut req = request("/", &[]);
    expect_continue(old.request_headers(&mut req, true).await);
    sp.config = Bytes::from_static(b"2");
    let gen2 = load(vec![sp]);
    drop(gen1);
    let (req2, _) = exchange(&gen2, &[name], "/").await.unwrap();
    assert_eq!(hdr(&req2.headers, "x-order"), Some("2"));
    // The old stream still finishes on its own VM.
    let mut resp = response(200, &[]);
    expect_continue(old.response_headers(&mut resp, true).await);
    assert_eq!(hdr(&resp.headers, "x-order"), Some("1"));
    old.finish(0, 0);
    let status = runtime().status_json();
    let e = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap();
    assert!(e["generation"].as_u64().unwrap() >= 2, "{e}");
    assert_eq!(e["sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn disk_cache_is_written_and_reused() {
    let dir = std::env::temp_dir().join(format!("wasp-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    rt.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1);
    let rt2 = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    let started = Instant::now();
    let set = rt2.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    exchange(&set, &["noop"], "/").await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `auto`: the filter serves on Winch, tiers up to Cranelift in the
/// background, and each compiler's artefact stays in the disk cache (a
/// compile prunes only other engines' entries), so a restart's tier-up is
/// a cache load.
#[tokio::test]
async fn auto_tiers_up_and_the_disk_cache_keeps_both_compilers() {
    let dir = std::env::temp_dir().join(format!("wasp-tier-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cwasm = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .count()
    };
    let tiered = |rt: &FilterRuntime| {
        let started = Instant::now();
        loop {
            let s = rt.status_json();
            if s[0]["compiler"] == "cranelift" {
                assert_eq!(s[0]["tier_up"], "done", "{s}");
                return;
            }
            assert_eq!(s[0]["tier_up"], "pending", "{s}");
            assert!(started.elapsed() < Duration::from_secs(60), "{s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let rt = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    rt.set_compiler(WasmCompiler::Auto);
    let set = rt.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    assert_eq!(rt.status_json()[0]["compiler"], "winch");
    exchange(&set, &["noop"], "/").await.unwrap();
    tiered(&rt);
    assert_eq!(cwasm(), 2);
    // Instances built from now on run the Cranelift code.
    exchange(&set, &["noop"], "/").await.unwrap();
    // A reload of the unchanged module starts on the Cranelift code it
    // already has: no second round on Winch.
    let set = rt.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    let s = rt.status_json();
    assert_eq!(s[0]["generation"], 2, "{s}");
    assert_eq!(s[0]["compiler"], "cranelift", "{s}");
    assert_eq!(s[0]["tier_up"], "done", "{s}");
    exchange(&set, &["noop"], "/").await.unwrap();
    drop((set, rt));

    // A Winch-only process (a `winch` server, `wasp filter test`) sharing
    // the cache compiles another module: it keeps the Cranelift artefact.
    let winch = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    let set = winch
        .load(vec![spec(TARGETS[0], "headers", "headers")])
        .unwrap();
    drop(set);
    assert_eq!(cwasm(), 3);

    // A restart loads the Cranelift code from disk and serves on it.
    let rt = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    rt.set_compiler(WasmCompiler::Auto);
    let set = rt.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    let s = rt.status_json();
    assert_eq!(s[0]["compiler"], "cranelift", "{s}");
    assert_eq!(s[0]["tier_up"], "done", "{s}");
    exchange(&set, &["noop"], "/").await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reloads while a tier-up is pending keep one job per filter queued (the
/// latest generation's), not one copy of the module per reload; a stale
/// `store` temp file of a dead process is pruned.
#[tokio::test]
async fn reloads_keep_one_tier_up_job_per_filter() {
    let dir = std::env::temp_dir().join(format!("wasp-tier-queue-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // No process has this pid (above the kernel's pid_max).
    let stale = dir.join("0000-0000.tmp4194305");
    std::fs::write(&stale, b"partial").unwrap();
    let rt = FilterRuntime::new(Some(dir.clone()), Arc::new(Canned)).unwrap();
    rt.set_compiler(WasmCompiler::Auto);
    for _ in 0..6 {
        rt.load(vec![
            spec(TARGETS[0], "noop", "a"),
            spec(TARGETS[0], "headers", "b"),
        ])
        .unwrap();
        assert!(rt.tier_jobs_waiting() <= 2, "{}", rt.tier_jobs_waiting());
    }
    // The first compile stored its artefact and pruned the directory.
    let started = Instant::now();
    while stale.exists() {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.stop_tier_up();
    assert_eq!(rt.tier_jobs_waiting(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dropped_streams_still_release_their_contexts() {
    let name = "drop-release";
    let set = load(vec![spec(TARGETS[0], "noop", name)]);
    let stats = runtime().stats_of(name).unwrap();
    let before = stats.calls(metrics::Phase::Done);
    {
        let mut s = set.stream(&pipeline(&[name]), info());
        let mut req = request("/", &[]);
        expect_continue(s.request_headers(&mut req, true).await);
        // Dropped without finish(): on_done and on_delete still run, on_log does not.
    }
    assert_eq!(stats.calls(metrics::Phase::Done), before + 2);
    assert_eq!(stats.calls(metrics::Phase::Log), 0);
    let mut s = set.stream(&pipeline(&[name]), info());
    let mut req = request("/", &[]);
    expect_continue(s.request_headers(&mut req, true).await);
    s.finish(0, 0);
    assert_eq!(stats.calls(metrics::Phase::Log), 1);
}

/// Callouts through a real hyper client to a real in-process hyper server.
mod real_upstream {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    struct HyperCallouts {
        addr: SocketAddr,
        client: Client<HttpConnector, Full<Bytes>>,
    }

    impl HttpCallouts for HyperCallouts {
        fn call(
            &self,
            cluster: &str,
            req: Request<Bytes>,
            _timeout: Duration,
        ) -> Option<CalloutFuture> {
            if cluster != "authz" {
                return None;
            }
            let (parts, body) = req.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let uri: http::Uri = format!("http://{}{}", self.addr, path).parse().unwrap();
            let mut r = Request::from_parts(parts, Full::new(body));
            *r.uri_mut() = uri;
            let client = self.client.clone();
            Some(Box::pin(async move {
                let resp = client.request(r).await.map_err(|e| e.to_string())?;
                let (p, b) = resp.into_parts();
                let body = b.collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok(Response::from_parts(p, body))
            }))
        }
    }

    async fn authz_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let user = hdr(req.headers(), "x-user").unwrap_or("").to_string();
                        let status = if user == "alice" { 200 } else { 401 };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(format!("real:{user}"))))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn callout_through_a_real_http_upstream() {
        let addr = authz_server().await;
        let client = Client::builder(TokioExecutor::new()).build_http();
        let cache =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/.cache");
        let rt = FilterRuntime::new(Some(cache), Arc::new(HyperCallouts { addr, client })).unwrap();
        for t in TARGETS {
            let set = rt.load(vec![spec(t, "callout", "authz-real")]).unwrap();
            let mut s = set.stream(&pipeline(&["authz-real"]), info());
            let mut req = request("/x", &[("x-user", "alice")]);
            expect_continue(s.request_headers(&mut req, true).await);
            assert_eq!(hdr(&req.headers, "x-authz"), Some("real:alice"), "{t}");
            s.finish(0, 0);

            let mut s = set.stream(&pipeline(&["authz-real"]), info());
            let mut req = request("/x", &[("x-user", "mallory")]);
            let r = expect_respond(s.request_headers(&mut req, true).await);
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
            assert_eq!(hdr(r.headers(), "x-authz-status"), Some("401"), "{t}");
        }
    }
}

/// Mean µs per request over `n` requests through `pl`: request headers,
/// response headers, finish.
async fn per_request_us(set: &Arc<FilterSet>, pl: &[Arc<str>], n: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        let mut s = set.stream(pl, info());
        let mut req = request("/bench?x=1", &[("x-a", "1"), ("user-agent", "bench")]);
        expect_continue(s.request_headers(&mut req, true).await);
        let mut resp = response(200, &[("content-type", "text/plain")]);
        expect_continue(s.response_headers(&mut resp, true).await);
        s.finish(0, 0);
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Per-request cost of the filter chain (request headers, response headers,
/// finish) with 0, 1 and 4 pass-through filters. Run with
/// `cargo test --release -p wasp --lib filter::tests::overhead -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn overhead() {
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
    let rss_before = rss_kib();
    let names = ["p1", "p2", "p3", "p4"];
    let set = load(names.iter().map(|n| spec(TARGETS[0], "noop", n)).collect());
    for chain in [0usize, 1, 4] {
        let pl = pipeline(&names[..chain]);
        let n = 20_000;
        // Warm up (creates this thread's VMs).
        for _ in 0..100 {
            let mut s = set.stream(&pl, info());
            let mut req = request("/", &[("x-a", "1")]);
            expect_continue(s.request_headers(&mut req, true).await);
            s.finish(0, 0);
        }
        let per = per_request_us(&set, &pl, n).await;
        println!("filters={chain}: {per:.2} us/request");
    }
    // A filter doing real guest work per request (JSON config walk, header
    // edits), where code quality shows more than with a pass-through.
    let mut hs = spec(TARGETS[0], "headers", "p-headers");
    hs.config =
        Bytes::from_static(br#"{"request":{"add":{"x-a":"1"}},"response":{"add":{"x-b":"2"}}}"#);
    let set = load(vec![hs]);
    let pl = pipeline(&["p-headers"]);
    for round in 0..2 {
        let per = per_request_us(&set, &pl, 20_000).await;
        if round == 1 {
            println!("headers filter: {per:.2} us/request");
        }
    }
    println!(
        "RSS: {} KiB before loading, {} KiB with 4 filters and their VMs on this thread",
        rss_before,
        rss_kib()
    );
}

/// Cold compile time (no cache) of the built-in filters and the
/// `versioned` fixture with the engine's settings, per compiler (Cranelift's
/// is what a tier-up takes, before linking and one validation instance). Run with
/// `cargo test --release -p wasp --lib filter::tests::compile_cost -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, not a check"]
fn compile_cost() {
    use super::plugin::Compiler;
    for compiler in [Compiler::Winch, Compiler::Cranelift] {
        compile_cost_of(compiler);
    }
}

fn compile_cost_of(compiler: super::plugin::Compiler) {
    let engine = wasmtime::Engine::new(&super::engine::engine_config(64, compiler)).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let files = [
        root.join("filters/router.wasm"),
        root.join("filters/access_log.wasm"),
        root.join("wasm-fixtures/wasm32-wasip1/versioned.wasm"),
    ];
    for f in files.iter().filter(|f| f.is_file()) {
        let bytes = std::fs::read(f).unwrap();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                wasmtime::Module::new(&engine, &bytes).unwrap();
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{} {}: {} KB, compile median {:.0} ms, min {:.0} ms",
            compiler.name(),
            f.file_name().unwrap().to_string_lossy(),
            bytes.len() / 1000,
            times[2],
            times[0]
        );
    }
}

#[tokio::test]
async fn old_generations_free_their_vms() {
    let set = load(vec![spec(TARGETS[0], "noop", "gen-free")]);
    exchange(&set, &["gen-free"], "/").await.unwrap();
    let id = set.id;
    assert!(worker::holds_set(id));
    drop(set);
    // The VM's root driver notices within its 250 ms poll.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!worker::holds_set(id));
}

#[tokio::test]
async fn shared_queue_wakes_the_registrant() {
    for t in TARGETS {
        let name = format!("queue-{t}");
        let set = load(vec![spec(t, "queue", &name)]);
        let (req, _) = exchange(&set, &[&name], "/first").await.unwrap();
        assert_eq!(hdr(&req.headers, "x-queue-missing"), None, "{t}");
        assert_eq!(
            hdr(&req.headers, "x-queue-unknown"),
            Some("not-found"),
            "{t}"
        );
        // proxy_on_queue_ready runs on this worker's root driver.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, resp) = exchange(&set, &[&name], "/second").await.unwrap();
        assert_eq!(hdr(&resp.headers, "x-queue-seen"), Some("1"), "{t}");
        assert_eq!(hdr(&resp.headers, "x-queue-last"), Some("/first"), "{t}");
    }
}

#[tokio::test]
async fn answers_for_abandoned_streams_reach_the_root_context() {
    for t in TARGETS {
        let name = format!("authz-abandoned-{t}");
        let set = load(vec![spec(t, "callout", &name)]);
        let stats = runtime().stats_of(&name).unwrap();
        // A first stream waits for this worker's instances to be built;
        // once they are, the filter runs (and pauses) on the first poll.
        let _ = exchange(&set, &[&name], "/warm").await;
        let answers = stats.calls(metrics::Phase::HttpCallResponse);
        {
            let mut s = set.stream(&pipeline(&[&name]), info());
            let mut req = request("/x", &[("x-user", "alice")]);
            // The client goes away while the filter waits for its callout.
            let mut fut = std::pin::pin!(s.request_headers(&mut req, true));
            let pending = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(pending, "{t}: the filter should have paused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The guest got its answer on the root context and did not trap.
        assert_eq!(
            stats.calls(metrics::Phase::HttpCallResponse),
            answers + 1,
            "{t}"
        );
        // No x-user: denied by a healthy VM (403), not failed (503).
        let r = exchange(&set, &[&name], "/x").await.unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
    }
}

#[test]
fn reload_under_load_never_fails_a_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    let t = TARGETS[0];
    let mk = |gen: u32| {
        let mut sp = spec(t, "order", "under-load");
        sp.config = Bytes::from(format!("g{gen}"));
        sp
    };
    let current = Arc::new(Mutex::new(load(vec![mk(0)])));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (current, stop, served) = (current.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let set = current.lock().unwrap().clone();
                        let (req, resp) = exchange(&set, &["under-load"], "/").await.unwrap();
                        let a = hdr(&req.headers, "x-order").unwrap().to_string();
                        // A stream stays on the generation it started on.
                        assert_eq!(hdr(&resp.headers, "x-order"), Some(a.as_str()));
                        served.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                });
            })
        })
        .collect();
    for gen in 1..=10 {
        std::thread::sleep(Duration::from_millis(30));
        let next = load(vec![mk(gen)]);
        *current.lock().unwrap() = next;
    }
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        served.load(Ordering::Relaxed) > 50,
        "too few requests served"
    );
    let status = runtime().status_json();
    let e = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "under-load")
        .unwrap();
    assert_eq!(e["state"], "ok");
}

#[tokio::test]
async fn a_body_paused_for_a_callout_resumes_on_its_answer() {
    for t in TARGETS {
        let name = format!("body-approve-{t}");
        let set = load(vec![spec(t, "body-callout", &name)]);

        // Approved: the whole body goes on once the answer resumes it.
        let mut s = set.stream(&pipeline(&[&name]), info());
        let mut req = request("/upload", &[]);
        expect_continue(s.request_headers(&mut req, false).await);
        assert!(matches!(
            s.request_body(Bytes::from_static(b"ali"), false),
            BodyVerdict::Hold
        ));
        assert!(
            matches!(
                s.request_body(Bytes::from_static(b"ce"), true),
                BodyVerdict::Wait
            ),
            "{t}: nothing goes on before the answer"
        );
        match std::future::poll_fn(|cx| s.poll_body_wait(cx, Dir::Request)).await {
            BodyVerdict::Forward(b) => assert_eq!(&b[..], b"alice", "{t}"),
            other => panic!("{t}: approved body: {other:?}"),
        }
        drop(s);

        // Denied: the filter's answer, the body never forwarded.
        let mut s = set.stream(&pipeline(&[&name]), info());
        let mut req = request("/upload", &[]);
        expect_continue(s.request_headers(&mut req, false).await);
        assert!(matches!(
            s.request_body(Bytes::from_static(b"mallory"), true),
            BodyVerdict::Wait
        ));
        match std::future::poll_fn(|cx| s.poll_body_wait(cx, Dir::Request)).await {
            BodyVerdict::Respond(r) => {
                assert_eq!(r.status(), StatusCode::FORBIDDEN, "{t}");
                assert_eq!(&r.body()[..], b"body denied\n", "{t}");
            }
            other => panic!("{t}: the body must not be forwarded: {other:?}"),
        }
    }
}

#[tokio::test]
async fn request_and_response_bodies_wait_each_for_their_own_answer() {
    let t = TARGETS[0];
    let name = "both-bodies-wait";
    let set = load(vec![spec(t, "body-callout", name)]);
    let mut s = set.stream(&pipeline(&[name]), info());
    let mut req = request("/upload", &[("x-check-response", "1")]);
    expect_continue(s.request_headers(&mut req, false).await);
    assert!(matches!(
        s.request_body(Bytes::from_static(b"alice"), true),
        BodyVerdict::Wait
    ));
    let mut resp = response(200, &[]);
    expect_continue(s.response_headers(&mut resp, false).await);
    assert!(matches!(
        s.response_body(Bytes::from_static(b" alice "), true),
        BodyVerdict::Wait
    ));
    // Both bodies' tasks poll at once, each for its own side.
    let (mut up, mut down) = (None, None);
    let both = std::future::poll_fn(|cx| {
        if up.is_none() {
            if let std::task::Poll::Ready(v) = s.poll_body_wait(cx, Dir::Request) {
                up = Some(v);
            }
        }
        if down.is_none() {
            if let std::task::Poll::Ready(v) = s.poll_body_wait(cx, Dir::Response) {
                down = Some(v);
            }
        }
        if up.is_some() && down.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("a waiting body was never woken");
    match up {
        Some(BodyVerdict::Forward(b)) => assert_eq!(&b[..], b"alice"),
        other => panic!("request body: {other:?}"),
    }
    match down {
        Some(BodyVerdict::Forward(b)) => assert_eq!(&b[..], b" alice "),
        other => panic!("response body: {other:?}"),
    }
}

#[tokio::test]
async fn a_header_phase_waits_for_a_callout_at_most_its_limit() {
    let t = TARGETS[0];
    let mut sp = spec(t, "callout", "authz-slow-limited");
    sp.config = Bytes::from_static(b"slow");
    let set = load(vec![sp]);
    let mut s = set.stream(&pipeline(&["authz-slow-limited"]), info());
    s.set_header_wait_limit(Duration::from_millis(100));
    let mut req = request("/x", &[("x-user", "alice")]);
    let started = Instant::now();
    // The callout's own timeout (2 s, answered 403) comes too late.
    let r = expect_respond(s.request_headers(&mut req, true).await);
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hdr(r.headers(), "x-wasp-error"), Some("filter_failed"));
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn a_body_waits_for_a_callout_at_most_its_limit() {
    let t = TARGETS[0];
    let name = "body-wait-limited";
    let set = load(vec![spec(t, "body-callout", name)]);
    let mut s = set.stream(&pipeline(&[name]), info());
    s.set_header_wait_limit(Duration::from_millis(100));
    // Asks the cluster that never answers (its own timeout is 1 s).
    let mut req = request("/upload", &[("x-authz-cluster", "slow")]);
    expect_continue(s.request_headers(&mut req, false).await);
    assert!(matches!(
        s.request_body(Bytes::from_static(b"alice"), true),
        BodyVerdict::Wait
    ));
    let started = Instant::now();
    let v = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| s.poll_body_wait(cx, Dir::Request)),
    )
    .await
    .expect("the wait limit must end the wait");
    match v {
        BodyVerdict::Respond(r) => {
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(hdr(r.headers(), "x-wasp-error"), Some("filter_failed"));
        }
        other => panic!("the held body must fail by policy: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "ended by the wait limit, not by the callout's own timeout"
    );
}

/// A waker that says whether it was woken.
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Ending the stream (the response over while a request-body callout is
/// still out) wakes the body task waiting inside the chain: it then finds
/// the chain gone and fails, instead of pending forever. Ended by `finish`
/// and by drop alike.
#[tokio::test]
async fn ending_the_stream_wakes_a_body_waiting_in_the_chain() {
    let t = TARGETS[0];
    let name = "body-wait-ended";
    let set = load(vec![spec(t, "body-callout", name)]);
    for finish in [true, false] {
        let mut s = set.stream(&pipeline(&[name]), info());
        // Asks the cluster that never answers: only the end can wake it.
        let mut req = request("/upload", &[("x-authz-cluster", "slow")]);
        expect_continue(s.request_headers(&mut req, false).await);
        assert!(matches!(
            s.request_body(Bytes::from_static(b"alice"), true),
            BodyVerdict::Wait
        ));
        let flag = Arc::new(Flag(Default::default()));
        let waker = std::task::Waker::from(flag.clone());
        let polled = s.poll_body_wait(&mut std::task::Context::from_waker(&waker), Dir::Request);
        assert!(polled.is_pending(), "finish={finish}");
        assert!(
            !flag.0.load(std::sync::atomic::Ordering::SeqCst),
            "finish={finish}"
        );
        if finish {
            s.finish(5, 0);
        } else {
            drop(s);
        }
        assert!(
            flag.0.load(std::sync::atomic::Ordering::SeqCst),
            "finish={finish}: the waiting body was not woken"
        );
    }
}

#[test]
fn a_config_that_cannot_fit_the_instance_pool_is_refused_at_load() {
    let mut sp = spec(TARGETS[0], "noop", "too-many-instances");
    sp.instances = 100_000;
    let err = runtime().load(vec![sp]).unwrap_err().to_string();
    assert!(
        err.contains("instance pool") && err.contains("limits.instances"),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_streams_get_their_own_instances() {
    let t = TARGETS[0];
    let name = "trap10-concurrent";
    let set = load(vec![spec(t, "trap-every-10th", name)]);
    // Nine streams in flight at once: each on its own instance (each sees
    // its instance's first request), none shared.
    let mut streams = Vec::new();
    for _ in 0..9 {
        let mut s = set.stream(&pipeline(&[name]), info());
        let mut req = request("/", &[]);
        expect_continue(s.request_headers(&mut req, true).await);
        assert_eq!(hdr(&req.headers, "x-seen"), Some("1"));
        streams.push(s);
    }
    for s in &mut streams {
        let mut resp = response(200, &[]);
        expect_continue(s.response_headers(&mut resp, true).await);
    }
    for s in streams {
        s.finish(0, 0);
    }
    let status = runtime().status_json();
    let entry = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap()
        .clone();
    assert_eq!(entry["instances"]["failed"], 0, "{entry}");
    assert_eq!(entry["instances"]["shared_leases"], 0, "{entry}");
    assert!(entry["instances"]["live"].as_i64().unwrap() >= 9, "{entry}");
}

/// Builds from the tiered-up code that keep failing send the generation
/// back to the code it loaded with (a failure streak, not one failure).
#[tokio::test]
async fn failing_cranelift_builds_fall_back_to_winch() {
    use super::plugin::{Compiler, TIERED_FAILURES_FALLBACK};
    let rt = FilterRuntime::new(None, Arc::new(Canned)).unwrap();
    rt.set_compiler(WasmCompiler::Auto);
    let set = rt.load(vec![spec(TARGETS[0], "noop", "noop")]).unwrap();
    let started = Instant::now();
    while rt.status_json()[0]["compiler"] != "cranelift" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let plugin = set.plugins[0].clone();
    for _ in 1..TIERED_FAILURES_FALLBACK {
        plugin.note_tiered_build(false);
    }
    plugin.note_tiered_build(true);
    for _ in 1..TIERED_FAILURES_FALLBACK {
        plugin.note_tiered_build(false);
    }
    assert_eq!(plugin.serving().compiler, Compiler::Cranelift);
    plugin.note_tiered_build(false);
    assert_eq!(plugin.serving().compiler, Compiler::Winch);
    let s = rt.status_json();
    assert_eq!(s[0]["compiler"], "winch", "{s}");
    assert_eq!(s[0]["tier_up"], "failed", "{s}");
    exchange(&set, &["noop"], "/").await.unwrap();
}

/// A body callback that leaves the body as it is passes the chunk on as
/// it came: the same bytes, not a copy made to own a shared buffer
/// (session 8: one allocation and a copy of every chunk per filter chain).
#[tokio::test]
async fn an_unchanged_body_passes_without_a_copy() {
    for t in TARGETS {
        let name = format!("add-headers-nocopy-{t}");
        let set = load(vec![spec(t, "add-headers", &name)]);
        let pl = pipeline(&[&name]);
        let mut s = set.stream(&pl, info());
        let mut req = request("/", &[]);
        expect_continue(s.request_headers(&mut req, false).await);
        // Shared, as hyper's chunks are (slices of its read buffer).
        let chunk = Bytes::from(b"hello body".to_vec());
        match s.request_body(chunk.clone(), true) {
            BodyVerdict::Forward(b) => {
                assert_eq!(b, chunk);
                assert_eq!(b.as_ptr(), chunk.as_ptr(), "{t}: request chunk was copied");
            }
            other => panic!("{t}: {other:?}"),
        }
        let mut resp = response(200, &[]);
        expect_continue(s.response_headers(&mut resp, false).await);
        assert_eq!(hdr(&resp.headers, "x-wasm-filter"), Some("add-headers"));
        let chunk = Bytes::from(b"hello again".to_vec());
        match s.response_body(chunk.clone(), true) {
            BodyVerdict::Forward(b) => {
                assert_eq!(b.as_ptr(), chunk.as_ptr(), "{t}: response chunk was copied");
            }
            other => panic!("{t}: {other:?}"),
        }
        s.finish(10, 11);
    }
}

/// A header phase runs to its end without awaiting once each filter has
/// an idle instance; the first stream of a fresh set usually has to wait
/// for its instance to be built, and the rest of its phase (which the
/// core awaits, boxed) ends as the whole phase would have.
#[tokio::test]
async fn header_phases_wait_only_for_an_instance_being_built() {
    let t = TARGETS[0];
    let names = ["add-headers-now-a", "add-headers-now-b"];
    let set = load(names.iter().map(|n| spec(t, "add-headers", n)).collect());
    let pl = pipeline(&names);

    let mut first = set.stream(&pl, info());
    let mut req = request("/", &[("x-keep", "1")]);
    // Usually the instances are still being built here, so the phase
    // waits; a build that finished first (a race with the builder, seen
    // on loaded machines) finishes the phase at once, which is as right.
    match first.request_headers_now(&mut req, true) {
        Err(wait) => expect_continue(first.request_headers_later(&mut req, wait).await),
        Ok(v) => expect_continue(v),
    }
    assert_eq!(hdr(&req.headers, "x-keep"), Some("1"));
    assert_eq!(req.headers.get_all("x-wasm-request").iter().count(), 2);
    let mut resp = response(200, &[]);
    expect_continue(first.response_headers(&mut resp, true).await);
    first.finish(0, 0);

    // Now both filters have an idle instance: nothing to wait for.
    for _ in 0..3 {
        let mut s = set.stream(&pl, info());
        let mut req = request("/", &[]);
        match s.request_headers_now(&mut req, true) {
            Ok(v) => expect_continue(v),
            Err(w) => panic!("a stream with idle instances waited: {w:?}"),
        }
        assert_eq!(req.headers.get_all("x-wasm-request").iter().count(), 2);
        let mut resp = response(200, &[]);
        match s.response_headers_now(&mut resp, true) {
            Ok(v) => expect_continue(v),
            Err(w) => panic!("a stream with idle instances waited: {w:?}"),
        }
        assert_eq!(resp.headers.get_all("x-wasm-filter").iter().count(), 2);
        s.finish(0, 0);
    }
}
