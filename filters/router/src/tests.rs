use super::*;
use wasp_sdk::testing::{Completed, Harness, TestRequest};

const RULES: &str = r#"
rules = [
  { header = "x-canary", equals = "1", cluster = "reviews-v2" },
  { cookie = "beta", equals = "yes", cluster = "reviews-beta", name = "beta-cookie" },
  { prefix = "/api/v2", cluster = "api-v2" },
  { split = { cluster = "reviews-v2", percent = 10, key_header = "x-user" } },
]
"#;

fn harness() -> Harness<Router> {
    Harness::<Router>::new()
        .config_toml(RULES)
        .cluster("reviews")
        .build()
}

fn cluster(done: &Completed) -> Option<String> {
    done.property("wasp.cluster")
}

#[test]
fn header_rule() {
    let mut h = harness();
    let done = h.run(TestRequest::get("/").header("x-canary", "1"));
    assert_eq!(cluster(&done).as_deref(), Some("reviews-v2"));
    assert_eq!(
        done.upstream().header("x-wasp-router-rule"),
        Some("header:x-canary=1")
    );
    assert_eq!(
        done.response_header("x-wasp-router-rule"),
        Some("header:x-canary=1")
    );
    let done = h.run(TestRequest::get("/").header("x-canary", "0"));
    assert_eq!(cluster(&done), None);
    assert_eq!(done.upstream().header("x-wasp-router-rule"), None);
    assert_eq!(done.response_header("x-wasp-router-rule"), None);
}

#[test]
fn cookie_rule() {
    let mut h = harness();
    let done = h.run(TestRequest::get("/").header("cookie", "session=abc; beta=yes"));
    assert_eq!(cluster(&done).as_deref(), Some("reviews-beta"));
    assert_eq!(
        done.upstream().header("x-wasp-router-rule"),
        Some("beta-cookie")
    );
    let done = h.run(TestRequest::get("/").header("cookie", "beta=no; notbeta=yes"));
    assert_eq!(cluster(&done), None);
}

#[test]
fn prefix_rule_and_first_match_wins() {
    let mut h = harness();
    let done = h.run(TestRequest::get("/api/v2/items?x=1"));
    assert_eq!(cluster(&done).as_deref(), Some("api-v2"));
    let done = h.run(TestRequest::get("/api/v1/items"));
    assert_eq!(cluster(&done), None);
    // Header rule comes first.
    let done = h.run(TestRequest::get("/api/v2").header("x-canary", "1"));
    assert_eq!(cluster(&done).as_deref(), Some("reviews-v2"));
}

#[test]
fn the_core_sees_the_chosen_cluster() {
    let mut h = Harness::<Router>::new()
        .config_toml(RULES)
        .cluster("reviews")
        .build();
    let mut ex = h.request(TestRequest::get("/").header("x-canary", "1"));
    assert_eq!(ex.property("cluster_name").as_deref(), Some("reviews-v2"));
    ex.respond(wasp_sdk::testing::TestResponse::ok());
    ex.finish();
    let mut ex = h.request(TestRequest::get("/"));
    assert_eq!(ex.property("cluster_name").as_deref(), Some("reviews"));
    ex.respond(wasp_sdk::testing::TestResponse::ok());
    ex.finish();
}

#[test]
fn canary_split_is_about_ten_percent_and_sticky() {
    let mut h = harness();
    let n = 4000;
    let mut picked = Vec::new();
    for i in 0..n {
        let done = h.run(TestRequest::get("/").header("x-user", &format!("user-{i}")));
        picked.push(cluster(&done).is_some());
    }
    let share = picked.iter().filter(|p| **p).count() as f64 / n as f64;
    // 10% ± 1.5 points (binomial sd at n=4000 is ~0.47 points).
    assert!((0.085..=0.115).contains(&share), "canary share {share}");
    // Sticky: the same users land in the same place again.
    for (i, was) in picked.iter().enumerate().take(500) {
        let done = h.run(TestRequest::get("/").header("x-user", &format!("user-{i}")));
        assert_eq!(cluster(&done).is_some(), *was, "user-{i} moved");
    }
    // No key header: no split.
    assert_eq!(cluster(&h.run(TestRequest::get("/"))), None);
}

#[test]
fn raising_the_percentage_only_adds_users() {
    let at = |p: u32| {
        let cfg = format!(
            "rules = [{{ split = {{ cluster = \"v2\", percent = {p}, key_header = \"x-user\" }} }}]"
        );
        let mut h = Harness::<Router>::new().config_toml(&cfg).build();
        (0..1000)
            .map(|i| {
                cluster(&h.run(TestRequest::get("/").header("x-user", &format!("u{i}")))).is_some()
            })
            .collect::<Vec<_>>()
    };
    let (p10, p30) = (at(10), at(30));
    assert!(p10.iter().zip(&p30).all(|(a, b)| !*a || *b));
    assert!(at(0).iter().all(|x| !x));
    assert!(at(100).iter().all(|x| *x));
}

#[test]
fn rule_header_can_be_renamed_or_disabled() {
    let mut h = Harness::<Router>::new()
        .config_toml(
            r#"rule_header = ""
rules = [{ header = "x-canary", cluster = "v2" }]"#,
        )
        .build();
    let done = h.run(TestRequest::get("/").header("x-canary", "anything"));
    assert_eq!(cluster(&done).as_deref(), Some("v2"), "presence match");
    assert!(done
        .upstream()
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-wasp")));
    let mut h = Harness::<Router>::new()
        .config_toml(
            r#"rule_header = "X-Route-Rule"
response_header = false
rules = [{ prefix = "/", cluster = "v2", name = "all" }]"#,
        )
        .build();
    let done = h.run(TestRequest::get("/x"));
    assert_eq!(done.upstream().header("x-route-rule"), Some("all"));
    assert_eq!(done.response_header("x-route-rule"), None);
}

#[test]
fn bad_rules_are_rejected_with_their_index() {
    for (cfg, needle) in [
        ("rules = []", "at least one rule"),
        (
            r#"rules = [{ cluster = "a" }]"#,
            "rules[0]: give exactly one of",
        ),
        (
            r#"rules = [{ header = "h", prefix = "/", cluster = "a" }]"#,
            "rules[0]: give exactly one of",
        ),
        (
            r#"rules = [{ prefix = "/", cluster = "a" }, { header = "h" }]"#,
            "rules[1]: needs a cluster",
        ),
        (
            r#"rules = [{ prefix = "api", cluster = "a" }]"#,
            "must start with '/'",
        ),
        (
            r#"rules = [{ split = { cluster = "a", percent = 120, key_header = "u" } }]"#,
            "percent 120 is outside",
        ),
        (
            r#"rules = [{ split = { cluster = "a", percent = 1, key_header = "u" }, cluster = "b" }]"#,
            "names its cluster inside split",
        ),
        (
            r#"rules = [{ header = "h", cluster = "a", typo = 1 }]"#,
            "unknown field `typo`",
        ),
    ] {
        let e = Harness::<Router>::new()
            .config_toml(cfg)
            .try_build()
            .err()
            .unwrap();
        assert!(e.contains(needle), "{cfg}: {e}");
    }
}
