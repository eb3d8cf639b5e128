use super::*;
use std::time::Duration;
use wasp_sdk::testing::{Harness, TestRequest, TestResponse};

const L: &str = ";listener=outbound;route=reviews;cluster=reviews";
/// The sum's microseconds become seconds on `/metrics`.
const SCALE: &str = ";__scale=1000000";

fn harness(config: &str) -> Harness<Metrics> {
    Harness::<Metrics>::new()
        .config_toml(config)
        .listener("outbound")
        .route("reviews")
        .cluster("reviews")
        .build()
}

fn req(h: &mut Harness<Metrics>, status: u16, ms: u64) {
    h.run_with(
        TestRequest::get("/"),
        TestResponse::new(status).latency(Duration::from_millis(ms)),
    );
}

#[test]
fn counts_requests_by_status_class() {
    let mut h = harness("");
    for _ in 0..3 {
        req(&mut h, 200, 3);
    }
    req(&mut h, 204, 3);
    req(&mut h, 404, 3);
    req(&mut h, 503, 3);
    req(&mut h, 502, 3);
    assert_eq!(
        h.counter(&format!("wasp_http_requests_total{L};code_class=2xx")),
        4
    );
    assert_eq!(
        h.counter(&format!("wasp_http_requests_total{L};code_class=4xx")),
        1
    );
    assert_eq!(
        h.counter(&format!("wasp_http_requests_total{L};code_class=5xx")),
        2
    );
    // Classes never seen are not defined at all.
    assert!(h
        .metric(&format!("wasp_http_requests_total{L};code_class=3xx"))
        .is_none());
}

#[test]
fn latency_histogram_with_configured_buckets() {
    let mut h = harness("buckets_ms = [5, 10, 2.5e1]");
    for ms in [1, 5, 7, 10, 20, 30, 1000] {
        req(&mut h, 200, ms);
    }
    let b = |le: &str| {
        h.counter(&format!(
            "wasp_http_request_duration_seconds_bucket{L};le={le}"
        ))
    };
    assert_eq!(b("0.005"), 2, "1 and 5 ms (le is inclusive)");
    assert_eq!(b("0.01"), 4);
    assert_eq!(b("0.025"), 5);
    assert_eq!(b("+Inf"), 7);
    assert_eq!(
        h.counter(&format!("wasp_http_request_duration_seconds_count{L}")),
        7
    );
    assert_eq!(
        h.counter(&format!("wasp_http_request_duration_seconds_sum{L}{SCALE}")),
        1_073_000,
        "microseconds, exported as seconds"
    );
}

#[test]
fn sub_millisecond_durations_are_not_lost_in_the_sum() {
    let mut h = harness("");
    for _ in 0..10 {
        h.run_with(
            TestRequest::get("/"),
            TestResponse::ok().latency(Duration::from_micros(300)),
        );
    }
    assert_eq!(
        h.counter(&format!("wasp_http_request_duration_seconds_sum{L}{SCALE}")),
        3000
    );
    assert_eq!(
        h.counter(&format!(
            "wasp_http_request_duration_seconds_bucket{L};le=0.001"
        )),
        10
    );
}

#[test]
fn overflow_folds_new_label_sets() {
    // The harness has one route per instance, so drive the state directly.
    let st = Metrics::configure(
        Config {
            buckets_ms: vec![10.0],
            max_label_sets: 1,
        },
        &mut Root::new_for_docs(),
    )
    .unwrap();
    st.record("l".into(), "a".into(), "x".into(), Some(200), Some(1000));
    st.record("l".into(), "b".into(), "y".into(), Some(200), Some(1000));
    let keys: Vec<_> = st.series.borrow().keys().cloned().collect();
    assert_eq!(keys.len(), 2);
    assert!(keys.contains(&("l".into(), "other".into(), "other".into())));
}

#[test]
fn requests_without_a_response_are_class_none() {
    let mut h = harness("");
    let ex = h.request(TestRequest::get("/"));
    drop(ex); // client went away before any response
    assert_eq!(
        h.counter(&format!("wasp_http_requests_total{L};code_class=none")),
        1
    );
}

#[test]
fn bad_buckets_are_rejected() {
    for (cfg, needle) in [
        ("buckets_ms = []", "between 1 and 64"),
        ("buckets_ms = [5, 5]", "buckets_ms[1]: 5 must be greater"),
        ("buckets_ms = [-1]", "buckets_ms[0]: -1 is not a positive"),
        (
            "buckets_ms = [1, 1.0001]",
            "buckets_ms[1]: 1.0001 is not a whole microsecond",
        ),
        (
            "buckets_ms = [0.0001]",
            "buckets_ms[0]: 0.0001 is not a whole",
        ),
        ("bucket = [1]", "unknown field `bucket`"),
    ] {
        let e = Harness::<Metrics>::new()
            .config_toml(cfg)
            .try_build()
            .err()
            .unwrap();
        assert!(e.contains(needle), "{cfg}: {e}");
    }
}
