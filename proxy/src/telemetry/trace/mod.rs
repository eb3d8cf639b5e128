//! OpenTelemetry traces over OTLP: a SERVER span per request and a CLIENT
//! span around its upstream call, with W3C trace context read from the
//! request (after the request filters ran) and written into the upstream
//! request, so the next sidecar continues the same trace.
//!
//! Threads. Spans start and end on the worker serving the request; ending
//! one is a `try_send` into the SDK's bounded batch queue (when it is full
//! the span is dropped, the request never waits). The SDK's batch thread
//! collects spans and hands each batch to [`export`], which runs the real
//! OTLP exporter on this module's own one-thread tokio runtime: tonic and
//! hyper need a reactor, and export I/O must never run on a worker's
//! current-thread runtime nor on the control thread. Export outcomes are
//! counted on `/metrics` (`wasp_trace_export_failures_total`, ...).
//!
//! Off (no `[tracing]` table): [`begin`] is one `OnceLock` load that returns
//! `None`, and the request path does nothing else.
//!
//! Sampling is `ParentBased(TraceIdRatioBased(sample_ratio))`: a request
//! whose `traceparent` is sampled (or not) is recorded (or not), whatever the
//! ratio; the ratio only decides for traces that start here.
//!
//! Set up once at start-up ([`init`]); `[tracing]` is restart-only.

mod export;
mod request;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

pub use export::register_metrics;
pub use request::RequestTrace;

use crate::config::{TraceProtocol, TracingConfig};

/// How long one export may take, retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Batch delay unless `OTEL_BSP_SCHEDULE_DELAY` (milliseconds) says otherwise.
const SCHEDULE_DELAY: Duration = Duration::from_secs(1);
/// Spans waiting for export unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise;
/// past it new spans are dropped. A span is well under 1 KiB, so this
/// bounds the queue to a few MiB.
const MAX_QUEUE: usize = 8192;
/// Spans per export unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says otherwise.
/// Exports run one at a time; with the SDK's 512 the exporter fell behind
/// at ~18k requests/s on one worker and ~3% of spans were dropped on the
/// full queue, with 2048 under 0.1% (bench/tracing.sh, 2 cores shared with
/// the collector). 2048 spans encode to well under gRPC's 4 MiB limit.
const MAX_BATCH: usize = 2048;

/// What every request needs to make spans; set once by [`init`].
#[derive(Debug)]
struct Tracing {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Keeps the exporter alive; dropping it flushes what is queued (bounded
/// by [`FLUSH_TIMEOUT`]) and stops the export runtime. Drop it outside any
/// tokio runtime (the flush blocks).
pub struct Guard {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("trace::Guard")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!("tracing: the last spans were not all exported: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

/// Starts the exporter when `[tracing]` is configured. Call once, before
/// the workers serve requests.
pub fn init(config: Option<&TracingConfig>) -> anyhow::Result<Option<Guard>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("wasp-otlp")
        .enable_all()
        .build()
        .context("tracing: cannot start the export runtime")?;
    // tonic spawns its connection task when the channel is built, so the
    // exporter is built inside the export runtime.
    let exporter = {
        let _in_runtime = runtime.enter();
        build_exporter(config)?
    };
    let exporter = export::Counting::new(exporter, runtime.handle().clone());
    let mut batch = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batch = batch.with_scheduled_delay(SCHEDULE_DELAY);
    }
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(MAX_QUEUE);
    }
    if std::env::var_os("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").is_none() {
        batch = batch.with_max_export_batch_size(MAX_BATCH);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(export::CountEnded(processor))
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracing = Tracing {
        tracer: provider.tracer("wasp"),
        propagator: TraceContextPropagator::new(),
    };
    if TRACING.set(tracing).is_err() {
        anyhow::bail!("tracing: already started in this process");
    }
    tracing::info!(
        endpoint = %config.endpoint,
        protocol = ?config.protocol,
        sample_ratio = config.sample_ratio,
        service = %config.service_name,
        "tracing: exporting spans over OTLP"
    );
    Ok(Some(Guard {
        provider,
        runtime: Some(runtime),
    }))
}

fn build_exporter(config: &TracingConfig) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let exporter = match config.protocol {
        TraceProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::recommended())
            .build(),
        TraceProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::recommended())
            .build(),
    };
    exporter.with_context(|| {
        format!(
            "tracing: cannot build the OTLP exporter for {}",
            config.endpoint
        )
    })
}

/// The request's trace, or `None` when tracing is off. Call when the
/// request arrives: its start time is now.
pub fn begin<B>(
    req: &http::Request<B>,
    peer: SocketAddr,
    local: SocketAddr,
    scheme: &'static str,
) -> Option<RequestTrace> {
    let tracing = TRACING.get()?;
    Some(RequestTrace::new(tracing, req, peer, local, scheme))
}
