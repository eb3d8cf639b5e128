use super::*;
use wasp_sdk::testing::{Completed, Harness, TestRequest};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn run(h: &mut Harness<TraceContext>, req: TestRequest) -> (Completed, Context) {
    let done = h.run(req);
    let tp = done
        .upstream()
        .header("traceparent")
        .expect("traceparent set")
        .to_string();
    let ctx = parse_traceparent(&tp).unwrap_or_else(|| panic!("invalid traceparent {tp}"));
    (done, ctx)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[test]
fn continues_an_incoming_trace_with_a_new_span() {
    let mut h = Harness::<TraceContext>::new().build();
    let (done, ctx) = run(
        &mut h,
        TestRequest::get("/")
            .header("traceparent", TP)
            .header("tracestate", "congo=t61rcWkgMzE"),
    );
    assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(hex(&ctx.span_id), "00f067aa0ba902b7", "new span id");
    assert!(ctx.sampled());
    let up = done.upstream();
    assert_eq!(up.header("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(
        done.property("wasp.trace_id").as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(done.property("wasp.span_id"), Some(hex(&ctx.span_id)));
    assert_eq!(
        done.property("wasp.parent_span_id").as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(done.property("wasp.sampled").as_deref(), Some("1"));
}

#[test]
fn continuity_across_two_hops() {
    // Hop 1 starts the trace; hop 2 (another sidecar) continues it.
    let mut a = Harness::<TraceContext>::new().seed(1).build();
    let mut b = Harness::<TraceContext>::new().seed(2).build();
    let (_, c1) = run(&mut a, TestRequest::get("/"));
    let (done2, c2) = run(
        &mut b,
        TestRequest::get("/").header("traceparent", &c1.traceparent()),
    );
    assert_eq!(c1.trace_id, c2.trace_id);
    assert_ne!(c1.span_id, c2.span_id);
    assert_eq!(
        done2.property("wasp.parent_span_id"),
        Some(hex(&c1.span_id))
    );
}

#[test]
fn keeps_the_callers_sampling_decision() {
    let mut h = Harness::<TraceContext>::new()
        .config_toml("sample_ratio = 1.0")
        .build();
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let (done, ctx) = run(
        &mut h,
        TestRequest::get("/").header("traceparent", unsampled),
    );
    assert!(!ctx.sampled());
    assert!(done
        .upstream()
        .header("traceparent")
        .unwrap()
        .ends_with("-00"));
}

#[test]
fn starts_a_trace_when_absent() {
    let mut h = Harness::<TraceContext>::new().build();
    let (done, ctx) = run(&mut h, TestRequest::get("/"));
    let tp = done.upstream().header("traceparent").unwrap().to_string();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
    assert!(is_hex(&done.property("wasp.trace_id").unwrap(), 32));
    assert!(is_hex(&done.property("wasp.span_id").unwrap(), 16));
    assert!(done.property("wasp.parent_span_id").is_none());
    assert!(ctx.sampled());
    // A different trace per request.
    let (_, ctx2) = run(&mut h, TestRequest::get("/"));
    assert_ne!(ctx.trace_id, ctx2.trace_id);
}

#[test]
fn malformed_traceparent_starts_a_new_trace_and_drops_tracestate() {
    let mut h = Harness::<TraceContext>::new().build();
    for bad in [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // v00 too long
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // misplaced dash
    ] {
        let (done, ctx) = run(
            &mut h,
            TestRequest::get("/")
                .header("traceparent", bad)
                .header("tracestate", "a=b"),
        );
        assert_ne!(
            hex(&ctx.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "{bad}"
        );
        assert_eq!(done.upstream().header("tracestate"), None, "{bad}");
    }
}

#[test]
fn future_versions_are_accepted() {
    let c = parse_traceparent(
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
    )
    .unwrap();
    assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x").is_none()
    );
}

#[test]
fn sampling_ratio_is_respected() {
    let mut never = Harness::<TraceContext>::new()
        .config_toml("sample_ratio = 0.0")
        .build();
    for _ in 0..50 {
        assert!(!run(&mut never, TestRequest::get("/")).1.sampled());
    }
    let mut quarter = Harness::<TraceContext>::new()
        .config_toml("sample_ratio = 0.25")
        .build();
    let n = 2000;
    let sampled = (0..n)
        .filter(|_| run(&mut quarter, TestRequest::get("/")).1.sampled())
        .count();
    let share = sampled as f64 / n as f64;
    assert!((0.21..0.29).contains(&share), "sampled share {share}");
}

#[test]
fn b3_single_header_is_continued_and_emitted() {
    let mut h = Harness::<TraceContext>::new()
        .config_toml("b3 = true")
        .build();
    let (done, ctx) = run(
        &mut h,
        TestRequest::get("/").header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    );
    assert_eq!(hex(&ctx.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
    assert!(ctx.sampled());
    let up = done.upstream();
    let span = hex(&ctx.span_id);
    assert_eq!(
        up.header("b3"),
        Some(format!("80f198ee56343ba864fe8b2a57d3eff7-{span}-1-e457b5a2e4d86bd1").as_str())
    );
    assert_eq!(
        up.header("x-b3-traceid"),
        Some("80f198ee56343ba864fe8b2a57d3eff7")
    );
    assert_eq!(up.header("x-b3-spanid"), Some(span.as_str()));
    assert_eq!(up.header("x-b3-parentspanid"), Some("e457b5a2e4d86bd1"));
    assert_eq!(up.header("x-b3-sampled"), Some("1"));
}

#[test]
fn b3_multi_headers_with_64_bit_ids() {
    let mut h = Harness::<TraceContext>::new()
        .config_toml("b3 = true")
        .build();
    let (_, ctx) = run(
        &mut h,
        TestRequest::get("/")
            .header("x-b3-traceid", "a3ce929d0e0e4736")
            .header("x-b3-spanid", "00f067aa0ba902b7")
            .header("x-b3-sampled", "0"),
    );
    assert_eq!(hex(&ctx.trace_id), "0000000000000000a3ce929d0e0e4736");
    assert!(!ctx.sampled());
    // x-b3-flags: 1 (debug) means sampled.
    let (_, ctx) = run(
        &mut h,
        TestRequest::get("/")
            .header("x-b3-traceid", "a3ce929d0e0e4736")
            .header("x-b3-spanid", "00f067aa0ba902b7")
            .header("x-b3-flags", "1"),
    );
    assert!(ctx.sampled());
}

#[test]
fn b3_deny_sampling_only_header_and_traceparent_precedence() {
    let mut h = Harness::<TraceContext>::new()
        .config_toml("b3 = true")
        .build();
    let (_, ctx) = run(&mut h, TestRequest::get("/").header("b3", "0"));
    assert!(!ctx.sampled(), "b3: 0 means do not sample");
    let (_, ctx) = run(
        &mut h,
        TestRequest::get("/")
            .header("traceparent", TP)
            .header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    );
    assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn b3_is_ignored_unless_enabled() {
    let mut h = Harness::<TraceContext>::new().build();
    let (done, ctx) = run(
        &mut h,
        TestRequest::get("/").header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    );
    assert_ne!(hex(&ctx.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(done.upstream().header("x-b3-traceid"), None);
}

#[test]
fn request_id_is_generated_only_when_absent() {
    let mut h = Harness::<TraceContext>::new().build();
    let (done, _) = run(&mut h, TestRequest::get("/"));
    let id = done.upstream().header("x-request-id").unwrap().to_string();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(parts[2].starts_with('4'), "uuid v4: {id}");
    let (done, _) = run(&mut h, TestRequest::get("/").header("x-request-id", "mine"));
    assert_eq!(done.upstream().header_all("x-request-id"), ["mine"]);

    let mut off = Harness::<TraceContext>::new()
        .config_toml("request_id = false")
        .build();
    let (done, _) = run(&mut off, TestRequest::get("/"));
    assert_eq!(done.upstream().header("x-request-id"), None);
}

#[test]
fn bad_config_is_rejected() {
    let e = Harness::<TraceContext>::new()
        .config_toml("sample_ratio = 1.5")
        .try_build()
        .err()
        .unwrap();
    assert!(e.contains("sample_ratio: 1.5 is outside"), "{e}");
}
