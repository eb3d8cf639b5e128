//! Collects the filter's log lines (`proxy_log`, and the guest's stdout
//! and stderr through WASI) while `wasp filter test` runs, as
//! `level: message` / `stdout: text` / `stderr: text`.
//!
//! One process runs one fixture file, one case at a time, so a single
//! buffer is enough: it is cleared before a case and taken after it. The
//! lock is taken once per guest log line, in a test tool, never in the
//! proxy.

use std::fmt::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

const GUEST: &str = "wasp::filter::guest";
const STDOUT: &str = "wasp::filter::stdout";
const STDERR: &str = "wasp::filter::stderr";

pub fn clear() {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

pub fn take() -> Vec<String> {
    std::mem::take(&mut *LINES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A level name of the fixture file (`[filter] log_level`).
pub fn level(name: &str) -> Option<LevelFilter> {
    match name {
        "trace" => Some(LevelFilter::TRACE),
        "debug" => Some(LevelFilter::DEBUG),
        "info" => Some(LevelFilter::INFO),
        "warn" => Some(LevelFilter::WARN),
        "error" => Some(LevelFilter::ERROR),
        _ => None,
    }
}

/// Installs the process's subscriber: the filter's lines at `guest` and
/// above are collected; wasp's own warnings and errors go to stderr.
pub fn install(guest: LevelFilter) {
    // The filter asks the level it is logged at, as in the proxy.
    crate::filter::set_reported_log_level(Some(guest));
    let collect = Targets::new()
        .with_target(GUEST, guest)
        .with_target(STDOUT, LevelFilter::TRACE)
        .with_target(STDERR, LevelFilter::TRACE);
    let own = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target(GUEST, LevelFilter::OFF)
        .with_target(STDOUT, LevelFilter::OFF)
        .with_target(STDERR, LevelFilter::OFF);
    let _ = tracing_subscriber::registry()
        .with(Collect.with_filter(collect))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(own),
        )
        .try_init();
}

struct Collect;

impl<S: Subscriber> Layer<S> for Collect {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let prefix = match meta.target() {
            GUEST => match *meta.level() {
                Level::TRACE => "trace",
                Level::DEBUG => "debug",
                Level::INFO => "info",
                Level::WARN => "warn",
                Level::ERROR => "error",
            },
            STDOUT => "stdout",
            STDERR => "stderr",
            _ => return,
        };
        let mut msg = Message(String::new());
        event.record(&mut msg);
        LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{prefix}: {}", msg.0));
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}
