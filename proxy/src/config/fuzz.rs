//! A bounded, seeded fuzz run of the config loader, part of `cargo test`:
//! hostile edits of valid files (every value replaced by overflowing,
//! negative, non-numeric, empty or oversized text; lines dropped,
//! duplicated, truncated; bytes inserted) must come back as problems with a
//! position, never as a panic. A reload runs this same code on the control
//! thread, where a panic would end the process.
//!
//! Longer runs: `WASP_FUZZ_CASES=200000 cargo test -p wasp --lib config::fuzz`;
//! `WASP_FUZZ_SEED` picks another sequence.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Valid files covering every section whose values are parsed.
const SEEDS: &[&str] = &[
    r#"
[proxy]
workers = 2
drain_timeout = "30s"
drain_delay = "1s"

[admin]
bind = "127.0.0.1:9901"

[log]
level = "info"
format = "json"

[tracing]
otlp_endpoint = "http://127.0.0.1:4317"
protocol = "grpc"
sample_ratio = 0.5
service_name = "svc"

[filters.trace]
module = "trace_context.wasm"
fail = "open"
config = { sample_ratio = 1.0, b3 = true }
limits = { cpu = "5ms", memory = "16MiB" }

[[listeners]]
name = "inbound"
bind = "127.0.0.1:15006"
pipeline = ["trace"]
limits = { max_connections = 100, max_header_bytes = "64KiB", max_body_bytes = "16MiB", header_timeout = "10s", idle_timeout = "60s" }

  [[listeners.routes]]
  name = "local"
  match = { prefix = "/", method = "GET", headers = { x-canary = "1" } }
  cluster = "local_app"
  timeout = "2s"
  retry = { on = ["connect-failure", "5xx"], attempts = 2, per_try_timeout = "500ms" }

  [[listeners.routes]]
  name = "split"
  match = { prefix = "/api/" }
  clusters = [ { name = "local_app", weight = 90 }, { name = "other", weight = 10 } ]
  rewrite_prefix = "/"

[clusters.local_app]
endpoints = ["127.0.0.1:8080", { address = "127.0.0.1:8081", weight = 3 }]
balance = "peak_ewma"
protocol = "http2"
connect_timeout = "1s"
health = { path = "/healthz", interval = "2s", timeout = "500ms", unhealthy = 3, healthy = 2 }
outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 50 }
limits = { max_connections = 1024, max_pending = 1024, max_requests = 1024 }
retry_budget = { ratio = 0.2, min_per_second = 10 }

[clusters.other]
endpoints = ["127.0.0.1:9201"]
balance = "ring_hash"
hash_key = { header = "x-user" }
"#,
    r#"
[[listeners]]
name = "out"
bind = "127.0.0.1:15001"
  [[listeners.routes]]
  match = { host = "reviews", regex = "^/v[0-9]+/.*$" }
  cluster = "reviews"

[clusters.reviews]
endpoints = ["127.0.0.1:${APP_PORT}"]
balance = "maglev"
hash_key = { header = "x-user" }
"#,
];

/// Values a hostile or careless editor might write anywhere.
const NASTY: &[&str] = &[
    "\"99999999999999999999s\"",
    "\"18446744073709551616ms\"",
    "\"1e308h\"",
    "\"-1s\"",
    "\"NaNs\"",
    "\"infs\"",
    "\".s\"",
    "\"0.0000000001ms\"",
    "\"5\"",
    "\"s\"",
    "\"\"",
    "\"18446744073709551615GiB\"",
    "\"99999999999999999999999KiB\"",
    "\"-5MiB\"",
    "\"1.5MiB\"",
    "0",
    "-1",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e309",
    "nan",
    "inf",
    "-0.0",
    "true",
    "[]",
    "{}",
    "[[]]",
    "\"🦀\"",
    "\"127.0.0.1:99999\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:65535\"",
    "\":80\"",
    "\"${UNSET_VAR}\"",
    "\"${\"",
    "\"((((((((((\"",
    "\"(a+)+$\"",
    "\"\\u0000\"",
    "{ name = \"local_app\", weight = 4294967295 }",
    "[ { name = \"local_app\", weight = 4294967295 }, { name = \"other\", weight = 4294967295 } ]",
];

fn cases() -> u64 {
    std::env::var("WASP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

fn seed() -> u64 {
    std::env::var("WASP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_2026)
}

/// Byte ranges of the values (`= value` up to the end of the line or the
/// next `,`/`}`), where most mutations aim.
fn value_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'=' {
            continue;
        }
        let start = i + 1;
        let mut end = start;
        let mut depth = 0i32;
        let mut in_str = false;
        while let Some(&c) = bytes.get(end) {
            match c {
                b'"' => in_str = !in_str,
                b'[' | b'{' if !in_str => depth += 1,
                b']' | b'}' if !in_str && depth > 0 => depth -= 1,
                b',' | b'}' | b']' if !in_str && depth == 0 => break,
                b'\n' => break,
                _ => {}
            }
            end += 1;
        }
        if end > start {
            spans.push((start, end));
        }
    }
    spans
}

fn mutate(rng: &mut StdRng, text: &str) -> String {
    let mut out = text.to_string();
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..10) {
            0..=5 => {
                let spans = value_spans(&out);
                if spans.is_empty() {
                    continue;
                }
                let (s, e) = spans[rng.gen_range(0..spans.len())];
                let v = NASTY[rng.gen_range(0..NASTY.len())];
                out.replace_range(s..e, &format!(" {v}"));
            }
            6 => {
                let lines: Vec<&str> = out.lines().collect();
                let drop = rng.gen_range(0..lines.len().max(1));
                out = lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop)
                    .map(|(_, l)| *l)
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            7 => {
                let lines: Vec<&str> = out.lines().collect();
                let dup = rng.gen_range(0..lines.len().max(1));
                let mut v: Vec<&str> = Vec::with_capacity(lines.len() + 1);
                for (i, l) in lines.iter().enumerate() {
                    v.push(l);
                    if i == dup {
                        v.push(l);
                    }
                }
                out = v.join("\n");
            }
            8 => {
                let mut cut = rng.gen_range(0..=out.len());
                while !out.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.truncate(cut);
            }
            _ => {
                let mut at = rng.gen_range(0..=out.len());
                while !out.is_char_boundary(at) {
                    at -= 1;
                }
                let junk: String = (0..rng.gen_range(1..4))
                    .map(|_| {
                        let pool = b"=[]{}\",.#\\\n 0123456789abcms$";
                        char::from(pool[rng.gen_range(0..pool.len())])
                    })
                    .collect();
                out.insert_str(at, &junk);
            }
        }
    }
    out
}

fn env(name: &str) -> Option<String> {
    (name == "APP_PORT").then(|| "8080".to_string())
}

/// Runs the loader on `cases()` mutated files; returns, for each file
/// that failed, its text and problems. Panics (fails the test) if the
/// loader panics or returns an empty or message-less error.
fn run_cases() -> Vec<(String, Vec<super::Problem>)> {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut failed = Vec::new();
    for case in 0..cases() {
        let base = SEEDS[rng.gen_range(0..SEEDS.len())];
        let text = mutate(&mut rng, base);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            super::parse(Path::new("/etc/wasp/wasp.toml"), &text, env)
        }));
        match outcome {
            Err(_) => panic!("case {case}: the loader panicked on:\n{text}"),
            Ok(Ok(_)) => {}
            Ok(Err(problems)) => {
                assert!(
                    !problems.is_empty(),
                    "case {case}: an error without problems"
                );
                for p in &problems {
                    assert!(
                        !p.message.is_empty(),
                        "case {case}: an empty message at {}:{} for:\n{text}",
                        p.line,
                        p.column
                    );
                }
                failed.push((text, problems));
            }
        }
    }
    failed
}

#[test]
fn hostile_edits_never_panic() {
    let failed = run_cases();
    // The mutations must mostly produce broken files, or this tests little.
    assert!(
        failed.len() as u64 > cases() / 2,
        "only {} of {} cases failed",
        failed.len(),
        cases()
    );
}

#[test]
fn every_problem_has_a_position() {
    let missing: Vec<String> = run_cases()
        .into_iter()
        .flat_map(|(text, problems)| {
            problems
                .into_iter()
                .filter(|p| p.line == 0)
                .map(move |p| format!("{}\n---\n{text}", p.message))
        })
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "problems without a file position:\n{}",
        missing.join("\n=====\n")
    );
}

#[test]
fn the_seeds_are_valid() {
    for seed in SEEDS {
        if let Err(p) = super::parse(Path::new("/etc/wasp/wasp.toml"), seed, env) {
            panic!("seed does not parse: {p:?}");
        }
    }
}
