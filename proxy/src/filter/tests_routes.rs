//! Per-route configs in the engine: a stream of a route with its own
//! config of a filter gets it from a root context of its own, on the same
//! instances as the filter's other streams (tests/route_filters.rs drives
//! the same through the binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;

use super::*;

struct NoCallouts;

impl HttpCallouts for NoCallouts {
    fn call(
        &self,
        _cluster: &str,
        _req: http::Request<Bytes>,
        _timeout: std::time::Duration,
    ) -> Option<CalloutFuture> {
        None
    }
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

fn adds(value: &str) -> Bytes {
    Bytes::from(format!(r#"{{"request":{{"add":{{"x-cfg":"{value}"}}}}}}"#))
}

#[tokio::test]
async fn a_route_config_is_a_root_context_on_the_same_instances() {
    let module = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm-fixtures/wasm32-wasip1/headers.wasm");
    let rt = FilterRuntime::new(None, Arc::new(NoCallouts)).unwrap();
    let mut spec = FilterSpec::new("hdr", module);
    spec.config = adds("base");
    spec.route_configs = vec![adds("one"), adds("two")];
    let set = rt.load(vec![spec]).unwrap();
    let entry = |config: u32| PipelineEntry {
        name: Arc::from("hdr"),
        config,
    };
    for round in 0..3 {
        for (config, want) in [(0, "base"), (1, "one"), (2, "two"), (1, "one")] {
            let mut s = set.route_stream(&[entry(config)], info());
            let mut req = Request::get("/").body(()).unwrap().into_parts().0;
            let v = s.request_headers(&mut req, true).await;
            assert!(matches!(v, Verdict::Continue), "{round}/{config}: {v:?}");
            let got = req.headers.get("x-cfg").and_then(|v| v.to_str().ok());
            assert_eq!(got, Some(want), "round {round}, config {config}");
            s.finish(0, 0);
        }
    }
    // A config no instance has fails the stream (by its policy: closed)
    // rather than running with the filter's own config.
    let mut s = set.route_stream(&[entry(3)], info());
    let mut req = Request::get("/").body(()).unwrap().into_parts().0;
    let v = s.request_headers(&mut req, true).await;
    assert!(
        matches!(&v, Verdict::Respond(r) if r.status() == 503),
        "{v:?}"
    );
    s.finish(0, 0);
    // Twelve sequential streams over three configs: no instance per
    // config, the ones one config would use.
    let plugin = &set.plugins[0];
    let created = plugin.counts.created.load(Ordering::Relaxed);
    assert!(created <= 3, "instances built: {created}");
}

/// Callouts that never answer: the test delivers the answer itself.
struct NeverAnswers;

impl HttpCallouts for NeverAnswers {
    fn call(
        &self,
        _cluster: &str,
        _req: http::Request<Bytes>,
        _timeout: std::time::Duration,
    ) -> Option<CalloutFuture> {
        Some(Box::pin(std::future::pending()))
    }
}

#[tokio::test]
async fn a_streams_callout_is_answered_on_its_routes_root_after_the_stream_is_gone() {
    use super::vm::{Callback, Vm, ROOT_ID};
    use super::worker::{CalloutDone, Reply};
    let module = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm-fixtures/wasm32-wasip1/callout.wasm");
    let rt = FilterRuntime::new(None, Arc::new(NeverAnswers)).unwrap();
    let mut spec = FilterSpec::new("authz", module);
    spec.config = Bytes::from_static(b"authz");
    spec.route_configs = vec![Bytes::from_static(b"strict"), Bytes::from_static(b"other")];
    let set = rt.load(vec![spec]).unwrap();
    let mut vm = Vm::new(&set.plugins[0], None).unwrap();
    for variant in [2, 0, 1] {
        let ctx = vm.create_context(variant).unwrap();
        let mut data = Some(Box::new(host::StreamData::new(info())));
        let headers = Callback::RequestHeaders { n: 0, eos: true };
        let out = vm.run(ctx, &mut data, headers).unwrap();
        assert!(
            out.pause,
            "variant {variant}: the fixture waits for its callout"
        );
        let [call] = &out.callouts[..] else {
            panic!("variant {variant}: {} callouts", out.callouts.len());
        };
        // The root is recorded when the call is made: the stream's parent.
        assert_eq!(call.root, ROOT_ID + variant, "variant {variant}");
        let (token, context, root) = (call.token, call.context, call.root);
        // The client went away: the stream's context is deleted first.
        vm.run(ctx, &mut data, Callback::Done).unwrap();
        vm.run(ctx, &mut data, Callback::Delete).unwrap();
        // The late answer runs on that root (as `root_answer_on_instance`
        // does), and the instance survives it.
        let done = CalloutDone {
            token,
            context,
            root,
            reply: Reply::Http(Ok(http::Response::new(Bytes::from_static(b"ok")))),
        };
        let cb = done.into_callback();
        assert!(
            matches!(cb, Callback::HttpCallResponse { root: r, .. } if r == root),
            "variant {variant}"
        );
        vm.run(root, &mut None, cb).unwrap();
    }
}
