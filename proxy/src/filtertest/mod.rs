//! `wasp filter test MODULE.wasm FIXTURES.toml`: runs any compiled
//! Proxy-Wasm module (any SDK, any language) in-process through the real
//! filter engine against the cases of a fixture file, and says what
//! differed.
//!
//! Owns the fixture schema (`fixture`), the harness that plays client,
//! upstream and callout clusters around one filter (`run`), the comparison
//! (`compare`) and the log capture (`capture`). It uses only the engine's
//! public API ([`crate::filter::FilterRuntime`], `FilterSet::stream`,
//! [`crate::filter::StreamFilters`]), the same calls `forward` makes, so a
//! case sees what a request through wasp would, minus routing and the
//! proxy's own headers.
//!
//! Runs on the CLI's main thread; each case runs on a thread of its own
//! with a current-thread runtime, like a worker. Not for the proxy: the
//! log capture installs the process's global subscriber.
//!
//! The user's guide is docs/filters.md ("Testing a filter").

mod capture;
mod compare;
pub mod fixture;
mod run;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

pub use compare::{compare, Mismatch};
pub use run::{run_case, Observed};

/// The fixture file `wasp filter new` writes beside a crate.
pub const FIXTURE_FILE: &str = "filter-test.toml";

/// The CLI command: exit 0 when every case passed, 1 when one differed or
/// could not run, 2 when the fixture file or arguments are unusable.
pub fn main(module: &Path, fixtures: &Path, only: Option<&str>) -> ExitCode {
    let file = match fixture::load(fixtures) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !module.is_file() {
        eprintln!("error: {}: no such module file", module.display());
        return ExitCode::from(2);
    }
    let Some(level) = capture::level(&file.filter.log_level) else {
        eprintln!(
            "error: {}: [filter] log_level {:?}: expected trace, debug, info, warn or error",
            fixtures.display(),
            file.filter.log_level
        );
        return ExitCode::from(2);
    };
    capture::install(level);
    // Each case loads the module into a fresh engine; the compiled code is
    // shared through a cache of our own, so only the first case compiles.
    let cache = std::env::temp_dir().join(format!("wasp-filter-test-{}", std::process::id()));

    let (mut ok, mut failed) = (0usize, 0usize);
    for case in &file.cases {
        if only.is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let started = Instant::now();
        let outcome = run::run_case(module, &file.filter, case, Some(&cache));
        let took = started.elapsed().as_millis();
        match outcome {
            Err(e) => {
                failed += 1;
                println!("FAIL  {}  ({took} ms)\n      could not run: {e}", case.name);
            }
            Ok(seen) => {
                let diff = compare::compare(&case.expect, &seen);
                if diff.is_empty() {
                    ok += 1;
                    println!("ok    {}  ({}, {took} ms)", case.name, summary(&seen));
                } else {
                    failed += 1;
                    println!("FAIL  {}  ({took} ms)", case.name);
                    for m in &diff {
                        println!("      {}:", m.field);
                        println!("        expected: {}", m.expected);
                        println!("        got:      {}", m.got);
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let total = ok + failed;
    if total == 0 {
        eprintln!("error: no case matches {:?}", only.unwrap_or_default());
        return ExitCode::from(2);
    }
    println!(
        "filter test {}: {total} case{}, {ok} ok, {failed} failed",
        module.display(),
        if total == 1 { "" } else { "s" }
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One line on what a passing case did.
fn summary(seen: &Observed) -> String {
    if let Some(e) = &seen.load_error {
        let first = e.lines().next().unwrap_or_default();
        return format!("did not load, as expected: {first}");
    }
    let upstream = if seen.upstream.is_some() {
        "reached upstream"
    } else {
        "answered by the filter"
    };
    let mut s = format!("{} to the client, {upstream}", seen.response.status);
    if !seen.callouts.is_empty() {
        s.push_str(&format!(", {} callout(s)", seen.callouts.len()));
    }
    if !seen.logs.is_empty() {
        s.push_str(&format!(", {} log line(s)", seen.logs.len()));
    }
    s
}
