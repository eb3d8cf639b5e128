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
    assert_eq!(c.admin.bind.to_string(), "127.0.0.1:9901");
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

#[test]
fn upstream_keys_parse_and_an_unchanged_cluster_is_equal() {
    let text = r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:15001"
  [[listeners.routes]]
  match = { host = "a" }
  cluster = "a"
  retry = { on = ["connect-failure", "reset", "5xx"], attempts = 2, per_try_timeout = "500ms" }

[clusters.a]
endpoints = ["127.0.0.1:1", { address = "127.0.0.1:2", weight = 3 }]
health = { path = "/healthz", interval = "2s", timeout = "500ms", unhealthy = 3, healthy = 2 }
outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 50 }
limits = { max_connections = 1024, max_pending = 1024, max_requests = 1024 }
retry_budget = { ratio = 0.2, min_per_second = 10 }

[clusters.b]
discovery = { dns = "b.example", port = 80, refresh = "5s", nameserver = "127.0.0.1:5353" }
balance = "maglev"
hash_key = { cookie = "session" }
"#;
    let old = parse_ok(text);
    assert_eq!(
        old.clusters[0].balance,
        Balance::PeakEwma,
        "peak_ewma is the default"
    );
    assert_eq!(old.clusters[0].endpoints.len(), 2);
    assert!(
        old.clusters[1].endpoints.is_empty(),
        "DNS has no static list"
    );
    let new = parse_ok(&text.replace("b.example", "c.example"));
    assert_eq!(old.clusters[0], new.clusters[0], "unchanged");
    assert_ne!(old.clusters[1], new.clusters[1], "changed");
    // Moving a section does not change it: positions are not identity.
    let moved = parse_ok(&format!("\n\n{text}"));
    assert_eq!(old, moved);
}

#[test]
fn upstream_key_errors_are_reported() {
    let p = problems(
        r#"
[clusters.a]
endpoints = ["127.0.0.1:1"]
discovery = { file = "x.toml" }
[clusters.b]
balance = "ring_hash"
discovery = { dns = "b.example" }
[clusters.c]
[[listeners]]
name = "l"
bind = "127.0.0.1:1"
"#,
    );
    let text: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
    assert!(text.iter().any(|m| m.contains("not both")), "{text:?}");
    assert!(text.iter().any(|m| m.contains("needs `port`")), "{text:?}");
    assert!(
        text.iter().any(|m| m.contains("needs `hash_key")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|m| m.contains("needs `endpoints` or `discovery`")),
        "{text:?}"
    );
}

// ---- [tracing] ----

#[test]
fn tracing_is_off_unless_configured() {
    assert!(parse_ok(GOOD).tracing.is_none());
    let c = parse_ok(&format!(
        "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n{GOOD}"
    ));
    let t = c.tracing.expect("tracing");
    assert_eq!(t.endpoint, "http://127.0.0.1:4317");
    assert_eq!(t.protocol, TraceProtocol::Grpc);
    assert_eq!(t.sample_ratio, 1.0);
    assert_eq!(t.service_name, "wasp");
}

#[test]
fn tracing_as_in_the_reference() {
    let c = parse_ok(&format!(
        "[tracing]\notlp_endpoint = \"http://collector:4318\"\nprotocol = \"http\"\nsample_ratio = 0.25\nservice_name = \"reviews-${{APP_PORT}}\"\n{GOOD}"
    ));
    let t = c.tracing.expect("tracing");
    assert_eq!(
        t.endpoint, "http://collector:4318/v1/traces",
        "HTTP gets the traces path"
    );
    assert_eq!(t.protocol, TraceProtocol::Http);
    assert_eq!(t.sample_ratio, 0.25);
    assert_eq!(t.service_name, "reviews-8080");
    let c = parse_ok(&format!(
        "[tracing]\notlp_endpoint = \"http://collector:4318/custom\"\nprotocol = \"http\"\n{GOOD}"
    ));
    assert_eq!(
        c.tracing.expect("tracing").endpoint,
        "http://collector:4318/custom"
    );
}

#[test]
fn tracing_problems_have_positions() {
    let p = problems("[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 1.5\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].line, p[0].column), (3, 16), "{p:?}");
    assert!(
        p[0].message.contains("sample_ratio = 1.5"),
        "{}",
        p[0].message
    );

    let p = problems("[tracing]\notlp_endpoint = \"collector:4317\"\n");
    assert_eq!((p[0].line, p[0].column), (2, 17), "{p:?}");
    assert!(
        p[0].message.contains("not an http://host:port URL"),
        "{}",
        p[0].message
    );

    let p = problems("[tracing]\notlp_endpoint = \"https://collector:4317\"\n");
    assert!(
        p[0].message.contains("https is not supported"),
        "{}",
        p[0].message
    );

    let p = problems("[tracing]\notlp_endpoint = \"http://c:4317\"\nprotocol = \"thrift\"\n");
    assert_eq!(p[0].line, 3, "{p:?}");

    let p = problems("[tracing]\notlp_endpont = \"http://c:4317\"\n");
    assert_eq!((p[0].line, p[0].column), (2, 1), "{p:?}");
}

#[test]
fn tracing_sample_ratio_may_be_an_integer() {
    for (text, want) in [("0", 0.0), ("1", 1.0)] {
        let c = parse_ok(&format!(
            "[tracing]\notlp_endpoint = \"http://c:4317\"\nsample_ratio = {text}\n{GOOD}"
        ));
        assert_eq!(c.tracing.expect("tracing").sample_ratio, want);
    }
}

#[test]
fn two_listeners_may_not_share_an_address() {
    let text = r#"
[[listeners]]
name = "a"
bind = "127.0.0.1:15006"

[[listeners]]
name = "b"
bind = "127.0.0.1:15006"

[[listeners]]
name = "c"
bind = "127.0.0.1:0"

[[listeners]]
name = "d"
bind = "127.0.0.1:0"

[[listeners]]
name = "e"
bind = "0.0.0.0:15007"

[[listeners]]
name = "f"
bind = "127.0.0.1:15007"
"#;
    let p = problems(text);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert_eq!(p[0].line, 8, "{p:#?}");
    assert!(
        p[0].message.contains("listener \"b\"")
            && p[0].message.contains("listener \"a\"'s address"),
        "{p:#?}"
    );
    // A wildcard and a specific address on one port overlap too.
    assert_eq!(p[1].line, 24, "{p:#?}");
    assert!(
        p[1].message.contains("listener \"f\"")
            && p[1]
                .message
                .contains("listener \"e\"'s address 0.0.0.0:15007"),
        "{p:#?}"
    );
}

#[test]
fn positions_after_a_substitution_point_into_the_file_as_written() {
    // `${APP_PORT}` (11 characters) becomes `8080` (4): the bad size after
    // it is still reported at its column in the file.
    let text = "[filters.f]\nmodule = \"${APP_PORT}.wasm\"\nlimits = { cpu = \"${APP_PORT}ms\", memory = \"lots\" }\n";
    let p = problems(text);
    let line = text.lines().nth(2).unwrap();
    let column = line.find("\"lots\"").unwrap() + 1;
    assert_eq!((p[0].line, p[0].column), (3, column), "{}", p[0].message);
}

#[test]
fn admin_settings_are_checked() {
    let c = parse_ok(&format!(
        "[admin]\nbind = \"127.0.0.1:9901\"\nprobes = \"0.0.0.0:15021\"\ntoken = \"abcdefghijklmnop${{APP_PORT}}\"\n{GOOD}"
    ));
    assert_eq!(c.admin.probes, Some("0.0.0.0:15021".parse().unwrap()));
    assert_eq!(c.admin.token.as_deref(), Some("abcdefghijklmnop8080"));
    let shown = serde_json::to_string(&c.file).unwrap();
    assert!(
        !shown.contains("abcdefghijklmnop") && shown.contains("<redacted>"),
        "{shown}"
    );
    assert!(!format!("{:?}", c.file).contains("abcdefghijklmnop"));

    for (admin, expect) in [
        ("token = \"short\"", "at least 16"),
        ("token = \"with spaces in the token\"", "printable ASCII"),
        ("probes = \"127.0.0.1:9901\"", "overlaps"),
        ("probes = \"0.0.0.0:9901\"", "overlaps"),
        ("bind = \"localhost:9901\"", "not an ip:port"),
    ] {
        let p = problems(&format!("[admin]\n{admin}\n{GOOD}"));
        assert!(p[0].message.contains(expect), "{admin}: {}", p[0].message);
        assert_eq!(p[0].line, 2, "{admin}");
    }
}

#[test]
fn cluster_problems_without_a_span_point_at_their_key() {
    let text = "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  cluster = \"a\"\n\n[clusters.a]\nendpoints = [\"127.0.0.1:2\"]\nconnect_timeout = \"0s\"\noutlier = { max_ejection_percent = 101 }\n\n[clusters.\"b\"]\nbalance = \"maglev\"\n";
    let p = problems(text);
    let at = |needle: &str| {
        p.iter()
            .find(|p| p.message.contains(needle))
            .map(|p| (p.line, p.column))
            .unwrap_or_else(|| panic!("{needle}: {p:?}"))
    };
    assert_eq!(at("connect_timeout"), (9, 1));
    assert_eq!(at("max_ejection_percent"), (10, 1));
    assert_eq!(at("needs `hash_key"), (13, 1));
    assert_eq!(at("\"b\" needs `endpoints`"), (12, 1));
    assert_eq!(
        find_key("[proxy]\nworkers = 5\n", "proxy", Some("workers")),
        Some(8)
    );
    assert_eq!(
        find_key("[proxy]\n[admin]\nworkers = 5\n", "proxy", Some("workers")),
        Some(0)
    );
    assert_eq!(find_key("a = 1\n", "proxy", None), None);
}

#[test]
fn filter_host_limits_parse_with_defaults_and_a_bound() {
    let c = parse_ok(
        "[filters.a]\nmodule = \"a.wasm\"\nlimits = { headers = 50, log_bytes = \"1KiB\", callouts = 3 }\n",
    );
    let l = c.file.filters["a"].limits.host_limits();
    assert_eq!((l.headers, l.log_bytes, l.callouts), (50, 1024, 3));
    let d = super::filter::HostLimits::default();
    assert_eq!(
        (l.header_bytes, l.shared_data, l.metrics),
        (d.header_bytes, d.shared_data, d.metrics)
    );
    assert_eq!((d.headers, d.header_bytes), (100, 60 << 10));
    let p = problems("[filters.a]\nmodule = \"a.wasm\"\nlimits = { headers = 40000 }\n");
    assert!(
        p.iter()
            .any(|p| p.message.contains("limits.headers = 40000")),
        "{p:?}"
    );
}

#[test]
fn stream_deadline_defaults_are_envoys() {
    let c = parse_ok(GOOD);
    let l = &c.listeners[0].limits;
    assert_eq!(l.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(l.request_timeout, None);
    // No route or cluster timeout: 15 s; "0s" on the route turns it off.
    assert_eq!(DEFAULT_ROUTE_TIMEOUT, Duration::from_secs(15));
    assert_eq!(route_timeout(None, None), Some(Duration::from_secs(15)));
    let route = c.listeners[0].routes.first().map(|r| r.timeout);
    assert_eq!(route, Some(None));
    assert_eq!(
        route_timeout(None, Some(Duration::from_secs(3))),
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        route_timeout(Some(Duration::from_secs(2)), Some(Duration::from_secs(3))),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        route_timeout(Some(Duration::ZERO), Some(Duration::from_secs(3))),
        None
    );
    let off = parse_ok(&GOOD.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\nlimits = { stream_idle_timeout = \"0s\", request_timeout = \"30s\" }",
    ));
    let l = &off.listeners[0].limits;
    assert_eq!(l.stream_idle_timeout, None);
    assert_eq!(l.request_timeout, Some(Duration::from_secs(30)));
}

#[test]
fn h2_keepalive_is_generous_by_default_and_can_be_off() {
    let l = parse_ok(GOOD).listeners[0].limits;
    assert_eq!(l.h2_keepalive_interval, Some(Duration::from_secs(60)));
    assert_eq!(l.h2_keepalive_timeout, Duration::from_secs(60));
    let off = parse_ok(&GOOD.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\nlimits = { h2_keepalive_interval = \"0s\", h2_keepalive_timeout = \"5s\" }",
    ));
    let l = off.listeners[0].limits;
    assert_eq!(l.h2_keepalive_interval, None);
    assert_eq!(l.h2_keepalive_timeout, Duration::from_secs(5));
    let zero = GOOD.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\nlimits = { h2_keepalive_timeout = \"0s\" }",
    );
    assert!(parse(Path::new("/etc/wasp/wasp.toml"), &zero, env).is_err());
}

#[test]
fn trust_forwarded_takes_cidrs_and_addresses() {
    let c = parse_ok(&GOOD.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\ntrust_forwarded = [\"10.0.0.0/8\", \"127.0.0.1\", \"fd00::/8\"]",
    ));
    let t = &c.listeners[0].trust_forwarded;
    assert!(t.trusts("10.1.2.3".parse().unwrap()));
    assert!(t.trusts("127.0.0.1".parse().unwrap()));
    assert!(!t.trusts("192.168.0.1".parse().unwrap()));
    let p = problems(&GOOD.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\ntrust_forwarded = [\"10.0.0.0/8\", \"10.0.0.0/40\"]",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].message.contains("10.0.0.0/40"), "{}", p[0].message);
    assert_eq!((p[0].line, p[0].column), (7, 34), "{p:?}");
}

#[test]
fn l4_and_capture_keys_parse_with_their_defaults() {
    let c = parse_ok(
        r#"
[[listeners]]
name = "db"
protocol = "tcp"
bind = "127.0.0.1:15432"
  [[listeners.routes]]
  match = { sni = "db.example.com", port = 5432, cidr = "10.0.0.0/8" }
  cluster = "pg"
  [[listeners.routes]]
  cluster = "passthrough"

[[listeners]]
name = "outbound"
bind = "0.0.0.0:15001"
capture = "outbound"
opaque_ports = [3306, 6379]
limits = { tcp_idle_timeout = "0s", detect_timeout = "1s" }
  [[listeners.routes]]
  match = { host = "web" }
  cluster = "pg"
  [[listeners.routes]]
  match = { sni = "db.example.com" }
  cluster = "pg"

[clusters.pg]
endpoints = ["127.0.0.1:5432"]
"#,
    );
    let db = &c.listeners[0].l4;
    assert!(db.is_tcp());
    assert_eq!(db.matches.len(), 2);
    assert_eq!(db.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(
        c.listeners[0].routes[1].clusters(),
        vec![super::l4::PASSTHROUGH]
    );
    let out = &c.listeners[1].l4;
    assert_eq!(out.capture, Some(CaptureMode::Outbound));
    assert!(out.detect_protocol);
    assert_eq!(out.opaque_ports, vec![3306, 6379]);
    assert_eq!(out.idle_timeout, None);
    assert_eq!(out.detect_timeout, Duration::from_secs(1));
    // On a capture listener, TCP routes are kept apart from HTTP ones.
    assert_eq!(c.listeners[1].routes.len(), 1);
    assert_eq!(out.tcp_routes.len(), 1);
    assert_eq!(out.matches.len(), 1);
}

#[test]
fn l4_key_mixups_are_errors_with_positions() {
    let p = problems(
        r#"
[[listeners]]
name = "db"
protocol = "tcp"
bind = "127.0.0.1:15432"
  [[listeners.routes]]
  match = { host = "db" }
  cluster = "pg"
  [[listeners.routes]]
  match = { cidr = "10.0.0.0/33" }
  cluster = "pg"

[[listeners]]
name = "web"
bind = "127.0.0.1:15433"
opaque_ports = [6379]
  [[listeners.routes]]
  match = { port = 80 }
  cluster = "pg"

[clusters.pg]
endpoints = ["127.0.0.1:5432"]

[clusters.passthrough]
endpoints = ["127.0.0.1:1"]
"#,
    );
    let text: Vec<String> = p
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(has("7:1") || has("6:3"), "{text:#?}");
    assert!(has("matches by `sni`, `port` or `cidr` only"), "{text:#?}");
    assert!(has("cidr \"10.0.0.0/33\""), "{text:#?}");
    assert!(has("set protocol = \"tcp\" on the listener"), "{text:#?}");
    assert!(has("opaque_ports needs `capture`"), "{text:#?}");
    assert!(has("is built in"), "{text:#?}");
    assert!(p.iter().all(|p| p.line > 0), "{text:#?}");
}

const ROUTE_FILTERS_HEAD: &str = r#"
[filters.authz]
module = "authz.wasm"
[filters.trace]
module = "trace.wasm"
[filters.extra]
module = "extra.wasm"
[clusters.app]
endpoints = ["127.0.0.1:1"]

[[listeners]]
name = "in"
bind = "127.0.0.1:2"
pipeline = ["trace", "authz"]
"#;

#[test]
fn route_pipelines_and_filter_configs_parse() {
    let text = format!(
        r#"{ROUTE_FILTERS_HEAD}
  [[listeners.routes]]
  match = {{ prefix = "/public" }}
  cluster = "app"
  pipeline = ["trace"]
  [[listeners.routes]]
  match = {{ prefix = "/extra" }}
  cluster = "app"
  pipeline_append = ["extra"]
  filters.authz.config = {{ mode = "strict" }}
  [[listeners.routes]]
  match = {{ prefix = "/none" }}
  cluster = "app"
  pipeline = []
  [[listeners.routes]]
  cluster = "app"
"#
    );
    let c = parse_ok(&text);
    let routes = &c.listeners[0].routes;
    let names = |i: usize| -> Option<Vec<String>> {
        let f = routes[i].filters.as_ref()?;
        Some(f.pipeline.iter().map(|n| n.to_string()).collect())
    };
    assert_eq!(names(0), Some(vec!["trace".to_string()]));
    assert_eq!(
        names(1),
        Some(vec!["trace".into(), "authz".into(), "extra".into()])
    );
    let configs = &routes[1].filters.as_ref().unwrap().configs;
    assert_eq!(
        configs.get("authz").and_then(|v| v.get("mode")),
        Some(&toml::Value::String("strict".into()))
    );
    assert_eq!(names(2), Some(vec![]), "an empty pipeline is explicit");
    assert_eq!(routes[3].filters, None, "no settings: the listener's");
}

#[test]
fn route_pipeline_problems_have_positions() {
    let text = format!(
        r#"{ROUTE_FILTERS_HEAD}
  [[listeners.routes]]
  cluster = "app"
  pipeline = ["ghost"]
  [[listeners.routes]]
  cluster = "app"
  pipeline = ["trace"]
  pipeline_append = ["extra"]
  [[listeners.routes]]
  cluster = "app"
  pipeline_append = ["authz"]
  [[listeners.routes]]
  cluster = "app"
  pipeline = ["trace"]
  filters.authz.config = {{ mode = "strict" }}
  [[listeners.routes]]
  cluster = "app"
  filters.nobody.config = "x"
  [[listeners.routes]]
  cluster = "app"
  filters.authz.confg = "x"
"#
    );
    let p = problems(&text);
    let all: Vec<String> = p
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    // The misspelt key is a parse error: it is reported alone.
    assert_eq!(p.len(), 1, "{all:#?}");
    assert!(
        all[0].starts_with("35:") && all[0].contains("confg"),
        "{all:#?}"
    );

    let text = text.replace("filters.authz.confg = \"x\"", "");
    let p = problems(&text);
    let all: Vec<String> = p
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    assert_eq!(p.len(), 5, "{all:#?}");
    let want = [
        ("18:15 ", "route 1: pipeline names filter \"ghost\""),
        ("21:14 ", "route 2: set either `pipeline`"),
        (
            "25:22 ",
            "filter \"authz\" is already in the listener's pipeline",
        ),
        (
            "29:26 ",
            "filter \"authz\" is not in this route's pipeline (\"trace\")",
        ),
        ("32:27 ", "no [filters.nobody] section"),
    ];
    for (i, (at, what)) in want.iter().enumerate() {
        assert!(
            all[i].starts_with(at) && all[i].contains(what),
            "{i}: want {at}{what}: {all:#?}"
        );
    }
}

#[test]
fn tcp_routes_take_no_pipeline() {
    let text = r#"
[filters.audit]
module = "audit.wasm"
[clusters.db]
endpoints = ["127.0.0.1:1"]
[[listeners]]
name = "db"
protocol = "tcp"
bind = "127.0.0.1:2"
  [[listeners.routes]]
  cluster = "db"
  pipeline = ["audit"]
"#;
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].line == 10 && p[0].message.contains("are for HTTP routes"),
        "{p:?}"
    );
}

#[test]
fn per_route_configs_of_a_filter_are_capped() {
    let mut text = ROUTE_FILTERS_HEAD.to_string();
    // Repeats do not count: the 65th distinct one is refused, at its value.
    for i in 0..=crate::config::route::MAX_ROUTE_CONFIGS {
        text.push_str(&format!(
            "  [[listeners.routes]]\n  cluster = \"app\"\n  filters.authz.config = \"v{i}\"\n  [[listeners.routes]]\n  cluster = \"app\"\n  filters.authz.config = \"v0\"\n"
        ));
    }
    let p = problems(&text);
    let all: Vec<String> = p
        .iter()
        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
        .collect();
    assert_eq!(p.len(), 1, "{all:#?}");
    let line = text
        .lines()
        .position(|l| l.contains("\"v64\""))
        .map(|i| i + 1)
        .unwrap();
    assert!(
        all[0].starts_with(&format!("{line}:")) && all[0].contains("more than 64 distinct"),
        "{all:#?}"
    );
}
