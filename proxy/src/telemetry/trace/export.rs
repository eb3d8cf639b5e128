//! The exporter the SDK's batch thread calls: it runs the OTLP exporter on
//! the export runtime and counts what happened.
//!
//! The batch thread drives `export` with a plain `block_on`, which has no
//! tokio reactor, so the real export is spawned on the export runtime and
//! only its `JoinHandle` is awaited there. Counters are process-wide
//! statics so `/metrics` shows them (at zero) even with tracing off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

struct Stats {
    ended: Counter,
    failures: Counter,
    exported: Counter,
    lost: Counter,
}

static STATS: LazyLock<Stats> = LazyLock::new(|| Stats {
    ended: Counter::default(),
    failures: Counter::default(),
    exported: Counter::default(),
    lost: Counter::default(),
});

/// Adds the export counters to the proxy's registry (`wasp_` prefix).
pub fn register_metrics(registry: &mut Registry) {
    registry.register(
        "trace_spans_ended",
        "Sampled spans handed to the export queue; ended - exported - lost = still queued, or dropped because the queue was full",
        STATS.ended.clone(),
    );
    registry.register(
        "trace_export_failures",
        "OTLP trace exports that failed (after the exporter's retries)",
        STATS.failures.clone(),
    );
    registry.register(
        "trace_spans_exported",
        "Spans the OTLP collector accepted",
        STATS.exported.clone(),
    );
    registry.register(
        "trace_spans_lost",
        "Spans lost because their OTLP export failed",
        STATS.lost.clone(),
    );
}

/// Wraps the OTLP exporter: runs it on the export runtime, counts outcomes.
#[derive(Debug)]
pub(super) struct Counting<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
    /// Set while exports fail, so the log says so once, not per batch.
    failing: Arc<AtomicBool>,
}

impl<E> Counting<E> {
    pub(super) fn new(inner: E, runtime: tokio::runtime::Handle) -> Self {
        Self {
            inner: Arc::new(inner),
            runtime,
            failing: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for Counting<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len() as u64;
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        let failing = self.failing.clone();
        async move {
            let result = match task.await {
                Ok(r) => r,
                Err(e) => Err(OTelSdkError::InternalFailure(format!(
                    "the export task failed: {e}"
                ))),
            };
            match &result {
                Ok(()) => {
                    STATS.exported.inc_by(spans);
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("tracing: OTLP export works again");
                    }
                }
                Err(e) => {
                    STATS.failures.inc();
                    STATS.lost.inc_by(spans);
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "tracing: OTLP export failed, {spans} spans lost (counted in wasp_trace_export_failures_total; logged once until it recovers): {e}"
                        );
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once when the provider is built, before any export holds
        // a clone of the exporter.
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.set_resource(resource),
            None => tracing::warn!("tracing: the exporter's resource could not be set"),
        }
    }
}

/// Counts the sampled spans that reach the batch queue, which the SDK's
/// processor does not expose: with the export counters this shows spans
/// dropped on a full queue.
#[derive(Debug)]
pub(super) struct CountEnded<P>(pub(super) P);

impl<P: SpanProcessor> SpanProcessor for CountEnded<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        STATS.ended.inc();
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}
