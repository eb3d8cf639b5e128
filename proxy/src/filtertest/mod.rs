//! `wasp filter test MODULE.wasm FIXTURES.toml`: runs any compiled
//! Proxy-Wasm module (any SDK, any language) in-process through the real
//! filter engine against the cases of a fixture file, and says what
//! differed.
//!
//! Owns the fixture schema (`fixture`), the harness that plays client,
//! upstream and callout clusters around one filter (`run`), the comparison
//! (`compare`) and the log capture (`capture`). It uses only the engine's
//! public API ([`crate::filter::FilterRuntime`], `FilterSet::stream`,
//! [`crate::filter::StreamFilters`]), the same calls `forward` makes, and
//! `forward`'s own header functions, so a case sees what a request through
//! wasp would, minus route matching and connections.
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
    for case in &file.cases {
        if let Err(e) = run::check_case(case) {
            eprintln!("error: {}: case {:?}: {e}", fixtures.display(), case.name);
            return ExitCode::from(2);
        }
    }
    capture::install(level);
    // Each case loads the module into a fresh engine; the compiled code is
    // shared through a cache of our own, so only the first case compiles.
    // The cache holds native code that is loaded without further checks, so
    // it must be a directory nobody else could have made or written to.
    let cache = match private_dir() {
        Ok(dir) => Some(dir),
        Err(e) => {
            eprintln!("warning: compiling for each case (no private cache directory: {e})");
            None
        }
    };

    let (mut ok, mut failed) = (0usize, 0usize);
    for case in &file.cases {
        if only.is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let started = Instant::now();
        let outcome = run::run_case(module, &file.filter, case, cache.as_deref());
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
    if let Some(dir) = &cache {
        let _ = std::fs::remove_dir_all(dir);
    }
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

/// A fresh directory under the temp dir with a random name, made by this
/// call (never an existing one: `create`, not `create_dir_all`), mode 0700
/// and owned by this user, for the compiled-module cache.
pub fn private_dir() -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let base = std::env::temp_dir();
    for _ in 0..8 {
        let dir = base.join(format!("wasp-filter-test-{:032x}", rand::random::<u128>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let me = rustix::process::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{}: not a private directory of this user",
                dir.display()
            ));
        }
        return Ok(dir);
    }
    Err(format!("{}: no free random name", base.display()))
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
    let upstream = match &seen.upstream {
        Some(u) if u.cut => "upstream request cut mid-body",
        _ => upstream,
    };
    let mut s = format!("{} to the client, {upstream}", seen.response.status);
    if seen.response.cut {
        s.push_str(", response cut by the filter");
    }
    if !seen.callouts.is_empty() {
        s.push_str(&format!(", {} callout(s)", seen.callouts.len()));
    }
    if !seen.logs.is_empty() {
        s.push_str(&format!(", {} log line(s)", seen.logs.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_cache_dir_is_new_private_and_unguessable() {
        let a = super::private_dir().unwrap_or_else(|e| panic!("{e}"));
        let b = super::private_dir().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a, b);
        for d in [&a, &b] {
            let mode = std::fs::metadata(d)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or_default();
            assert_eq!(mode, 0o700, "{}", d.display());
            assert!(!d
                .to_string_lossy()
                .contains(&std::process::id().to_string()));
            let _ = std::fs::remove_dir(d);
        }
    }
}
