//! `wasp filter test` end to end: the real binary runs real modules (the
//! community-SDK fixtures of tests/wasm and the AssemblyScript example)
//! against the fixture files in tests/filter-test/, which pass; a fixture
//! with wrong expectations fails with a diff naming each wrong field; a
//! fixture file with an unknown key is refused with its line and column;
//! `wasp filter new DIR` adds a fixture file to an existing filter folder.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{assemblyscript_filter, fixture, TempDir, WASP};

fn fixtures(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/filter-test")).join(name)
}

fn filter_test(module: &Path, fixtures: &Path) -> (Option<i32>, String, String) {
    let out: Output = Command::new(WASP)
        .args(["filter", "test"])
        .arg(module)
        .arg(fixtures)
        .output()
        .expect("run wasp filter test");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a fixture file that must pass: exit 0, one `ok` line per case.
fn passes(module: &Path, file: &Path, cases: usize) {
    let (code, out, err) = filter_test(module, file);
    assert_eq!(code, Some(0), "{out}{err}");
    let ok_lines = out.lines().filter(|l| l.starts_with("ok    ")).count();
    assert_eq!(ok_lines, cases, "{out}");
    let plural = if cases == 1 { "" } else { "s" };
    assert!(
        out.contains(&format!(": {cases} case{plural}, {cases} ok, 0 failed")),
        "{out}"
    );
}

#[test]
fn community_sdk_fixtures_pass() {
    let wasip1 = |n| fixture("wasm32-wasip1", n);
    passes(&wasip1("headers"), &fixtures("headers.toml"), 2);
    passes(&wasip1("callout"), &fixtures("callout.toml"), 4);
    passes(&wasip1("metrics"), &fixtures("metrics.toml"), 1);
    passes(&wasip1("body-rewrite"), &fixtures("body-rewrite.toml"), 3);
    passes(&wasip1("properties"), &fixtures("properties.toml"), 1);
    passes(&wasip1("late-headers"), &fixtures("late-headers.toml"), 1);
    passes(
        &wasip1("configure-false"),
        &fixtures("configure-false.toml"),
        1,
    );
    // The same module built for the other guest target (exports malloc).
    passes(
        &fixture("wasm32-unknown-unknown", "headers"),
        &fixtures("headers.toml"),
        2,
    );
}

#[test]
fn the_assemblyscript_filter_passes_its_fixtures() {
    let file = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/filters/assemblyscript/filter-test.toml"
    ));
    let Some(module) = assemblyscript_filter("the_assemblyscript_filter_passes_its_fixtures")
    else {
        return;
    };
    passes(&module, &file, 3);
}

#[test]
fn a_wrong_expectation_fails_with_a_diff_naming_the_field() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("wrong.toml");
    std::fs::write(
        &file,
        r#"
[filter]
config = { response = { add = { x-resp-added = "1" } } }

[[case]]
name = "right"
[case.expect.response]
headers = { x-resp-added = "1" }

[[case]]
name = "wrong"
upstream = { body = "hello" }
[case.expect]
logs = ["never logged"]
metrics = { nothing_here = 2 }
[case.expect.upstream]
headers = { x-added = "yes" }
[case.expect.response]
status = 201
headers = { x-resp-added = "2" }
body = "hullo"
"#,
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "headers"), &file);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("ok    right"), "{out}");
    assert!(out.contains("FAIL  wrong"), "{out}");
    assert!(out.contains("2 cases, 1 ok, 1 failed"), "{out}");
    // Each wrong field, with what was expected and what came.
    let section = out.split("FAIL  wrong").nth(1).unwrap_or_default();
    for (field, expected, got) in [
        ("upstream.headers.x-added:", "\"yes\"", "(absent)"),
        ("response.status:", "201", "200 (body \"hello\")"),
        ("response.headers.x-resp-added:", "\"2\"", "\"1\""),
        ("response.body:", "\"hullo\"", "\"hello\""),
        (
            "logs[0]:",
            "a line containing \"never logged\"",
            "info: headers configured",
        ),
        ("metrics.\"nothing_here\":", "2", "no such sample"),
    ] {
        let at = section
            .find(field)
            .unwrap_or_else(|| panic!("no {field} in the diff:\n{out}"));
        let rest = &section[at..];
        let expected_line = rest.lines().nth(1).unwrap_or_default();
        let got_line = rest.lines().nth(2).unwrap_or_default();
        assert!(
            expected_line.contains("expected:") && expected_line.contains(expected),
            "{field}: {expected_line:?}\n{out}"
        );
        assert!(
            got_line.contains("got:") && rest.contains(got),
            "{field}: {got_line:?}\n{out}"
        );
    }
}

/// `route_config` (a route's `filters.NAME.config`) runs the case on that
/// route's root context: the passing file, and a case that expects the
/// filter's own config there, whose diff names the header.
#[test]
fn a_route_config_runs_on_the_routes_root_context() {
    let headers = fixture("wasm32-wasip1", "headers");
    passes(&headers, &fixtures("route-config.toml"), 3);
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("route.toml");
    std::fs::write(
        &file,
        r#"
[filter]
config = { request = { add = { x-added = "yes" } } }

[[case]]
name = "expects the filter's own config on a route with its own"
route_config = { request = { add = { x-route = "checkout" } } }
[case.expect.upstream]
headers = { x-added = "yes" }
"#,
    )
    .unwrap();
    let (code, out, err) = filter_test(&headers, &file);
    assert_eq!(code, Some(1), "{out}{err}");
    let section = out
        .split("FAIL  expects the filter's own config")
        .nth(1)
        .unwrap_or_else(|| panic!("no FAIL line:\n{out}"));
    let at = section
        .find("upstream.headers.x-added:")
        .unwrap_or_else(|| panic!("no upstream.headers.x-added in the diff:\n{out}"));
    let rest = &section[at..];
    assert!(
        rest.lines()
            .nth(1)
            .is_some_and(|l| l.contains("expected:") && l.contains("\"yes\"")),
        "{out}"
    );
    assert!(
        rest.lines()
            .nth(2)
            .is_some_and(|l| l.contains("got:") && l.contains("(absent)")),
        "{out}"
    );
}

#[test]
fn a_filter_that_fails_is_a_503_the_fixture_can_expect() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("loop.toml");
    std::fs::write(
        &file,
        r#"
[filter]
name = "spin"
[[case]]
name = "the CPU deadline fails the request, not the tool"
request = { path = "/loop" }
[case.expect.upstream]
reached = false
[case.expect.response]
status = 503
headers = { x-wasp-error = "filter_failed" }
"#,
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "loop"), &file);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn unknown_keys_are_refused_with_line_and_column() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[[case]]\nname = \"typo\"\n[case.expect.response]\nstatus = 200\nheader = { a = \"b\" }\n",
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "headers"), &file);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains(&format!("{}:5:1:", file.display())),
        "no file:line:column in: {err}"
    );
    assert!(err.contains("unknown field `header`"), "{err}");
}

#[test]
fn filter_new_adds_a_fixture_file_to_an_existing_filter() {
    let dir = TempDir::new("filter-new");
    let project = dir.path().join("my-as-filter");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("package.json"), "{}").unwrap();
    let out = Command::new(WASP)
        .args(["filter", "new"])
        .arg(&project)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(project.join("filter-test.toml")).unwrap();
    assert!(text.contains("name = \"my_as_filter\""), "{text}");
    assert!(!text.contains("{{"), "{text}");
    // Nothing else was written, and a second run does not overwrite it.
    assert_eq!(std::fs::read_dir(&project).unwrap().count(), 2);
    let again = Command::new(WASP)
        .args(["filter", "new"])
        .arg(&project)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn case_selects_cases_by_name() {
    let out = Command::new(WASP)
        .args(["filter", "test"])
        .arg(fixture("wasm32-wasip1", "callout"))
        .arg(fixtures("callout.toml"))
        .args(["--case", "denied"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    denied by the authz cluster"), "{text}");
    assert!(text.contains(": 1 case, 1 ok, 0 failed"), "{text}");
    let none = Command::new(WASP)
        .args(["filter", "test"])
        .arg(fixture("wasm32-wasip1", "callout"))
        .arg(fixtures("callout.toml"))
        .args(["--case", "no such case"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
}

#[test]
fn the_harness_treats_a_filter_as_the_proxy_does() {
    // Callouts from on_configure and fire-and-forget ones are answered; the
    // proxy's header hygiene, `via` and `x-forwarded-*` apply; log_level is
    // what proxy_get_log_level answers; answers made after the request or
    // response started are reported as cuts, not as the client's response.
    passes(
        &fixture("wasm32-wasip1", "harness"),
        &fixtures("harness.toml"),
        3,
    );
}

#[test]
fn a_cut_the_fixture_does_not_expect_is_a_mismatch() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("cut.toml");
    std::fs::write(
        &file,
        r#"
[[case]]
name = "late answer"
request = { headers = { x-late = "response" } }
upstream = { chunks = ["a", "b"] }
[case.expect.response]
status = 200
"#,
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "harness"), &file);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("response.cut:"), "{out}");
}

#[test]
fn the_fixture_sets_the_filter_limits() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("limits.toml");
    std::fs::write(
        &file,
        r#"
[filter]
limits = { memory = "64KiB", cpu = "20ms" }
max_body_bytes = "1MiB"
[[case]]
name = "too little memory to load"
[case.expect]
load_error = "memory limit exceeded"
"#,
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "headers"), &file);
    assert_eq!(code, Some(0), "{out}{err}");
    std::fs::write(
        &file,
        "[filter]\nlimits = { bogus = 1 }\n[[case]]\nname = \"x\"\n",
    )
    .unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "headers"), &file);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn more_header_values_than_a_map_holds_is_a_fixture_error() {
    let dir = TempDir::new("filter-test");
    let file = dir.path().join("many.toml");
    let mut text = "[[case]]\nname = \"many\"\n[case.request.headers]\n".to_string();
    for i in 0..40_000 {
        text.push_str(&format!("x-many-{i} = \"v\"\n"));
    }
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = filter_test(&fixture("wasm32-wasip1", "headers"), &file);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("more header values than a map holds"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
