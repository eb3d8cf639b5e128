use super::*;
use std::time::Duration;
use wasp_sdk::log::Level;
use wasp_sdk::testing::{Harness, TestRequest, TestResponse};

fn json_lines(h: &Harness<AccessLog>) -> Vec<serde_json::Value> {
    h.log_lines(Level::Info)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn json_line_has_every_field() {
    let mut h = Harness::<AccessLog>::new()
        .listener("outbound")
        .route("reviews")
        .cluster("reviews")
        .build();
    h.run_with(
        TestRequest::post("/api/items?x=1", "12345")
            .authority("shop.local")
            .header("x-request-id", "rid-1"),
        TestResponse::new(201)
            .body("created!")
            .latency(Duration::from_micros(42_250)),
    );
    let lines = json_lines(&h);
    assert_eq!(lines.len(), 1, "one line per request");
    let l = &lines[0];
    assert_eq!(l["method"], "POST");
    assert_eq!(l["path"], "/api/items?x=1");
    assert_eq!(l["authority"], "shop.local");
    assert_eq!(l["status"], 201);
    assert_eq!(l["duration_ms"], 42.25);
    assert_eq!(l["bytes_in"], 5);
    assert_eq!(l["bytes_out"], 8);
    assert_eq!(l["upstream"], "127.0.0.1:8080");
    assert_eq!(l["listener"], "outbound");
    assert_eq!(l["route"], "reviews");
    assert_eq!(l["cluster"], "reviews");
    assert_eq!(l["request_id"], "rid-1");
    assert!(l["error"].is_null());
    assert!(l["trace_id"].is_null());
    let keys: Vec<&str> = l.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for f in FIELDS {
        assert!(keys.contains(&f.name()), "missing key {}", f.name());
    }
}

#[test]
fn json_escapes_and_reads_wasp_properties() {
    let mut h = Harness::<AccessLog>::new()
        .property("wasp.error", "upstream_timeout")
        .property("wasp.trace_id", "4bf92f3577b34da6a3ce929d0e0e4736")
        .build();
    h.run_with(TestRequest::get("/q?s=\"x\"\\"), TestResponse::new(504));
    let l = &json_lines(&h)[0];
    assert_eq!(l["path"], "/q?s=\"x\"\\");
    assert_eq!(l["error"], "upstream_timeout");
    assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(l["status"], 504);
}

#[test]
fn format_string_with_missing_values() {
    let mut h = Harness::<AccessLog>::new()
        .config_toml(r#"format = "{method} {path} {status} {duration_ms}ms err={error} {{ok}}""#)
        .build();
    h.run_with(
        TestRequest::get("/x"),
        TestResponse::ok().latency(Duration::from_millis(3)),
    );
    assert_eq!(h.log_lines(Level::Info), ["GET /x 200 3.000ms err=- {ok}"]);
}

#[test]
fn local_responses_are_logged_too() {
    let mut h = Harness::<AccessLog>::new()
        .config_json(r#"{"format":"{status}"}"#)
        .build();
    h.run_with(TestRequest::get("/a"), TestResponse::new(404));
    h.run_with(TestRequest::get("/b"), TestResponse::new(503));
    assert_eq!(h.log_lines(Level::Info), ["404", "503"]);
}

#[test]
fn bad_formats_are_rejected_with_a_reason() {
    let e = Harness::<AccessLog>::new()
        .config_json(r#"{"format":"{method} {nope}"}"#)
        .try_build()
        .err()
        .unwrap();
    assert!(e.contains("unknown field {nope}"), "{e}");
    assert!(e.contains("duration_ms"), "lists known fields: {e}");
    let e = Harness::<AccessLog>::new()
        .config_json(r#"{"format":"{method"}"#)
        .try_build()
        .err()
        .unwrap();
    assert!(e.contains("unclosed"), "{e}");
    let e = Harness::<AccessLog>::new()
        .config_json(r#"{"fmt":"json"}"#)
        .try_build()
        .err()
        .unwrap();
    assert!(e.contains("unknown field `fmt`"), "{e}");
}

#[test]
fn default_config_is_json() {
    let mut h = Harness::<AccessLog>::new().build();
    h.run(TestRequest::get("/"));
    assert_eq!(json_lines(&h)[0]["path"], "/");
}

#[test]
fn json_string_escaping_round_trips() {
    for t in [
        "plain",
        "q\"uote",
        "back\\slash",
        "nl\n\r\t",
        "ctl\u{1}\u{1f}",
        "ünï",
    ] {
        let mut s = String::new();
        push_json_string(&mut s, t);
        assert_eq!(serde_json::from_str::<String>(&s).unwrap(), t, "{s}");
    }
    let mut s = String::new();
    push_millis(&mut s, 5);
    assert_eq!(s, "0.005");
}
