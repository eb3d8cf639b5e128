//! Process metrics under the standard Prometheus process-collector names
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
//! `process_open_fds`, ...), read from `/proc/self` at scrape time.
//!
//! A scrape costs one read of `/proc/self/stat`, one listing of
//! `/proc/self/fd` and a `getrlimit`; the start time is read once. Anything
//! that cannot be read (not Linux, a restricted `/proc`) is left out of the
//! exposition rather than failing the scrape. Runs on the control thread
//! only.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// The fields of `/proc/self/stat` these metrics use.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    /// User plus system CPU time, in clock ticks.
    cpu_ticks: u64,
    threads: u64,
    /// Start time after boot, in clock ticks.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/<pid>/stat` (see proc(5)). The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are
/// counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Open descriptors: the entries of `/proc/self/fd`, less the one the listing
/// itself holds open.
fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Process start, Unix seconds; it never changes, so it is read once.
fn start_time(stat: &Stat, ticks_per_sec: u64) -> Option<f64> {
    static START: OnceLock<Option<f64>> = OnceLock::new();
    *START.get_or_init(|| {
        let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
        Some(boot as f64 + stat.start_ticks as f64 / ticks_per_sec as f64)
    })
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Appends the process metrics that can be read to `out`.
pub fn render(out: &mut String) {
    let ticks_per_sec = rustix::param::clock_ticks_per_second().max(1);
    let page_size = rustix::param::page_size() as u64;
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t));
    if let Some(s) = &stat {
        metric(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            s.cpu_ticks as f64 / ticks_per_sec as f64,
        );
    }
    if let Some(n) = open_fds() {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            n,
        );
    }
    if let Some(n) = max_fds() {
        metric(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            n,
        );
    }
    let Some(s) = stat else {
        return;
    };
    metric(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        s.virtual_bytes,
    );
    metric(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        s.resident_pages * page_size,
    );
    metric(
        out,
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        s.threads,
    );
    if let Some(t) = start_time(&s, ticks_per_sec) {
        metric(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_even_with_parentheses_and_spaces_in_the_name() {
        let text = "4242 (wasp (worker) 1) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
                    250 75 0 0 20 0 9 0 123456 104857600 2560 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 3 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                cpu_ticks: 325,
                threads: 9,
                start_ticks: 123456,
                virtual_bytes: 104_857_600,
                resident_pages: 2560,
            })
        );
    }

    #[test]
    fn truncated_or_garbled_stat_is_none() {
        assert_eq!(parse_stat("4242 (wasp) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
        let garbled = "1 (x) S 1 1 1 0 -1 0 0 0 0 0 ten 5 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(garbled), None);
    }

    #[test]
    fn boot_time_from_proc_stat() {
        let text = "cpu  1 2 3 4\nintr 5 6\nctxt 77\nbtime 1763790000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_763_790_000));
        assert_eq!(parse_boot_time("cpu 1 2\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_plausibly() {
        let mut out = String::new();
        render(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing:\n{out}"))
        };
        assert!(value("process_resident_memory_bytes") > 1024.0 * 1024.0);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
    }
}
