use std::path::Path;

use super::*;

fn env(name: &str) -> Option<String> {
    (name == "APP_PORT").then(|| "8080".to_string())
}

fn parse_ok(text: &str) -> Config {
    match parse(Path::new("/etc/wasp/wasp.toml"), text, env) {
        Ok(c) => c,
        Err(p) => panic!("unexpected problems: {p:?}"),
    }
}

fn problems(text: &str) -> Vec<Problem> {
    parse(Path::new("wasp.toml"), text, env).expect_err("should fail")
}

const GOOD: &str = r#"
[proxy]
workers = 2

[[listeners]]
name = "inbound"
bind = "127.0.0.1:15006"
  [[listeners.routes]]
  match = { prefix = "/" }
  cluster = "local_app"

[clusters.local_app]
endpoints = ["127.0.0.1:${APP_PORT}", { address = "127.0.0.1:8081", weight = 3 }]
protocol = "http2"
"#;

#[test]
fn defaults_and_interpolation() {
    let c = parse_ok(GOOD);
    assert_eq!(c.workers, 2);
    assert_eq!(c.admin.to_string(), "127.0.0.1:9901");
    assert_eq!(c.filters_dir, Path::new("/etc/wasp/filters.d"));
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    let l = &c.listeners[0];
    assert_eq!(l.limits.max_header_bytes, 64 << 10);
    assert_eq!(l.limits.header_timeout, Duration::from_secs(10));
    let cl = &c.clusters[0];
    assert_eq!(cl.endpoints[0].addr.to_string(), "127.0.0.1:8080");
    assert_eq!(cl.endpoints[1].weight, 3);
    assert_eq!(cl.protocol, UpstreamProtocol::Http2);
    assert_eq!(cl.connect_timeout, Duration::from_secs(1));
}

#[test]
fn unknown_key_has_line_and_column() {
    let p = problems("[proxy]\nworkers = 1\nwrokers = 2\n");
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].line, p[0].column), (3, 1));
    assert!(
        p[0].message.contains("unknown field `wrokers`"),
        "{}",
        p[0].message
    );
}

#[test]
fn bad_duration_points_at_value() {
    let p = problems("[proxy]\ndrain_timeout = \"30 fortnights\"\n");
    assert_eq!(p[0].line, 2);
    assert!(p[0].message.contains("unknown unit"), "{}", p[0].message);
}

#[test]
fn unset_variable_is_named_with_position() {
    let p = problems("[admin]\nbind = \"${ADMIN_BIND}\"\n");
    assert_eq!((p[0].line, p[0].column), (2, 9));
    assert!(
        p[0].message.contains("ADMIN_BIND is not set"),
        "{}",
        p[0].message
    );
}

#[test]
fn every_semantic_problem_is_reported() {
    let text = r#"
[[listeners]]
name = "a"
bind = "nonsense"

[[listeners]]
name = "b"
bind = "127.0.0.1:1"
pipeline = ["ghost"]
  [[listeners.routes]]
  cluster = "missing"
"#;
    let p = problems(text);
    let all: Vec<String> = p
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    assert_eq!(p.len(), 3, "{all:#?}");
    assert!(
        all[0].starts_with("4:8 ") && all[0].contains("not an ip:port"),
        "{all:#?}"
    );
    assert!(
        all[1].starts_with("9:13 ") && all[1].contains("filter \"ghost\""),
        "{all:#?}"
    );
    assert!(
        all[2].starts_with("11:13 ") && all[2].contains("unknown cluster \"missing\""),
        "{all:#?}"
    );
}
