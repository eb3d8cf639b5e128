//! A real OTLP trace receiver for the tracing tests and the tracing bench:
//! the collector's `TraceService` (gRPC, from `opentelemetry-proto`) served
//! by tonic over hyper's h2c, or `POST /v1/traces` with a protobuf body
//! (OTLP/HTTP). It keeps every span it receives with its resource's
//! `service.name`.
//!
//! Included with `#[path]` (not from `support/mod.rs`), so only the users
//! compile it.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;
use tower_service::Service as _;

pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;
pub const STATUS_ERROR: i32 = 2;

/// One received span and the service that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string, int or bool attribute, rendered as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<Received>>,
    /// Export requests received.
    exports: AtomicU64,
    /// Spans received, kept or not.
    counted: AtomicU64,
    /// Count only (the bench's sink), don't keep.
    count_only: bool,
}

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        self.exports.fetch_add(1, Ordering::Relaxed);
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.counted.fetch_add(n as u64, Ordering::Relaxed);
        if self.count_only {
            return;
        }
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
}

#[derive(Clone)]
struct Grpc(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A receiver on a loopback port; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// OTLP/gRPC: `TraceService/Export` over h2c.
    pub async fn grpc() -> Self {
        Self::grpc_on("127.0.0.1:0".parse().unwrap(), false).await
    }

    /// OTLP/gRPC on `addr`; with `count_only`, spans are counted and dropped.
    pub async fn grpc_on(addr: SocketAddr, count_only: bool) -> Self {
        let store = Arc::new(Store {
            count_only,
            ..Store::default()
        });
        let server = TraceServiceServer::new(Grpc(store.clone()));
        Self::serve(addr, store, move |req| {
            let mut server = server.clone();
            async move { server.call(req).await }
        })
        .await
    }

    /// OTLP/HTTP: `POST /v1/traces` with a protobuf body.
    pub async fn http() -> Self {
        let store = Arc::new(Store::default());
        let s = store.clone();
        Self::serve(
            "127.0.0.1:0".parse().unwrap(),
            store,
            move |req: http::Request<Incoming>| {
                let store = s.clone();
                async move { Ok::<_, Infallible>(http_export(&store, req).await) }
            },
        )
        .await
    }

    async fn serve<S, F, B>(addr: SocketAddr, store: Arc<Store>, handler: S) -> Self
    where
        S: Fn(http::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: std::future::Future<Output = Result<http::Response<B>, Infallible>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind(addr).await.expect("bind collector");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service_fn(handler))
                        .await;
                });
            }
        });
        Self { addr, store, task }
    }

    pub fn spans(&self) -> Vec<Received> {
        self.store.spans.lock().unwrap().clone()
    }

    pub fn exports(&self) -> u64 {
        self.store.exports.load(Ordering::Relaxed)
    }

    /// Spans received so far, kept or not.
    pub fn counted(&self) -> u64 {
        self.store.counted.load(Ordering::Relaxed)
    }

    /// The spans of `trace_id` once there are at least `n`, waiting up to
    /// `limit` (batch export runs on a timer). Panics with what did arrive.
    pub async fn wait_trace(&self, trace_id: &str, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let got: Vec<Received> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id() == trace_id)
                .collect();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} of {n} spans of trace {trace_id} within {limit:?}; all received: {:#?}",
                    got.len(),
                    self.spans()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn http_export(store: &Store, req: http::Request<Incoming>) -> http::Response<Full<Bytes>> {
    let status = |code: u16| {
        http::Response::builder()
            .status(code)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return status(404);
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(400);
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(export) => {
            store.add(export);
            let answer = ExportTraceServiceResponse {
                partial_success: None,
            };
            http::Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::from(answer.encode_to_vec())))
                .unwrap()
        }
        Err(_) => status(400),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
