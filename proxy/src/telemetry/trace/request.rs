//! One request's spans: the SERVER span (arrival to response head) and the
//! CLIENT span (the upstream call), with attributes after the OpenTelemetry
//! HTTP semantic conventions.
//!
//! Lives inside the request future, on the worker. The server span is
//! started lazily, when the upstream call begins (or when the response is
//! ready, for requests the proxy answers itself), but with the arrival time
//! as its start: by then the request filters have run, so a `traceparent`
//! they added or changed is the parent. A span that is not sampled costs
//! its ids and the `traceparent` written upstream; its name and attributes
//! are never built. Dropping a `RequestTrace` (a cancelled
//! request) ends its spans.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::Span;

use super::Tracing;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The spans of one request; see the module docs.
#[derive(Debug)]
pub struct RequestTrace {
    tracing: &'static Tracing,
    start: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    peer: SocketAddr,
    local: SocketAddr,
    scheme: &'static str,
    /// The trace context as the client sent it, for requests answered
    /// before the upstream call (no later headers to read it from).
    received: (Option<HeaderValue>, Option<HeaderValue>),
    server: Option<Span>,
    client: Option<Span>,
    /// The `x-wasp-error` code when the proxy made the response.
    error: Option<&'static str>,
}

impl RequestTrace {
    pub(super) fn new<B>(
        tracing: &'static Tracing,
        req: &http::Request<B>,
        peer: SocketAddr,
        local: SocketAddr,
        scheme: &'static str,
    ) -> Self {
        let h = req.headers();
        Self {
            tracing,
            start: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            host: h.get(http::header::HOST).cloned(),
            peer,
            local,
            scheme,
            received: (h.get(TRACEPARENT).cloned(), h.get(TRACESTATE).cloned()),
            server: None,
            client: None,
            error: None,
        }
    }

    /// Starts the upstream call: the server span (parent from `headers`,
    /// the request as the filters left it), then the client span, whose
    /// context replaces the trace headers of the upstream request.
    pub fn upstream_start(
        &mut self,
        headers: &mut HeaderMap,
        route: &Arc<str>,
        cluster: &Arc<str>,
        endpoint: SocketAddr,
        url: &Uri,
    ) {
        let parent = self.tracing.propagator.extract(&Headers(headers));
        self.start_server(&parent, Some(route));
        let Some(server) = &self.server else { return };
        let parent = Context::new().with_remote_span_context(server.span_context().clone());
        let builder = self
            .tracing
            .tracer
            .span_builder(method_name(&self.method))
            .with_kind(SpanKind::Client);
        let mut client = self.tracing.tracer.build_with_context(builder, &parent);
        if client.is_recording() {
            client.update_name(span_name(&self.method, Some(route)));
            client.set_attributes([
                KeyValue::new("http.request.method", method_name(&self.method)),
                KeyValue::new("server.address", endpoint.ip().to_string()),
                KeyValue::new("server.port", i64::from(endpoint.port())),
                KeyValue::new("network.peer.address", endpoint.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(endpoint.port())),
                KeyValue::new("url.full", url.to_string()),
                KeyValue::new("wasp.cluster", Value::from(cluster.clone())),
            ]);
        }
        let cx = Context::new().with_remote_span_context(client.span_context().clone());
        headers.remove(TRACESTATE);
        self.tracing
            .propagator
            .inject_context(&cx, &mut HeadersMut(headers));
        self.client = Some(client);
    }

    /// Ends the client span: the upstream's status, or the error code when
    /// no response came.
    pub fn upstream_end(&mut self, result: Result<u16, &'static str>) {
        let Some(mut client) = self.client.take() else {
            return;
        };
        match result {
            Ok(status) => {
                client.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    client.set_attribute(KeyValue::new("error.type", status.to_string()));
                    client.set_status(Status::error(""));
                }
            }
            Err(code) => {
                client.set_attribute(KeyValue::new("error.type", code));
                client.set_status(Status::error(code));
            }
        }
        client.end();
    }

    /// Marks the response as made by the proxy, with its `x-wasp-error` code.
    pub fn error(&mut self, code: &'static str) {
        self.error = Some(code);
    }

    /// Ends the server span as the response head goes out.
    pub fn finish(mut self, status: u16, route: Option<&Arc<str>>) {
        if self.server.is_none() {
            let received = &self.received;
            let parent = self.tracing.propagator.extract(&Received(received));
            self.start_server(&parent, route);
        }
        if let Some(client) = &mut self.client {
            client.end();
        }
        let Some(server) = &mut self.server else {
            return;
        };
        if !server.is_recording() {
            return;
        }
        server.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(code) = self.error {
            server.set_attribute(KeyValue::new("error.type", code));
            server.set_status(Status::error(code));
        } else if status >= 500 {
            // Server spans count only 5xx as errors (4xx is the client's).
            server.set_attribute(KeyValue::new("error.type", status.to_string()));
            server.set_status(Status::error(""));
        }
        server.end();
    }

    fn start_server(&mut self, parent: &Context, route: Option<&Arc<str>>) {
        if self.server.is_some() {
            return;
        }
        // Sampling needs neither name nor attributes (parent and trace id
        // only), so an unsampled span never formats them.
        let builder = self
            .tracing
            .tracer
            .span_builder(method_name(&self.method))
            .with_kind(SpanKind::Server)
            .with_start_time(self.start);
        let mut server = self.tracing.tracer.build_with_context(builder, parent);
        if server.is_recording() {
            if route.is_some() {
                server.update_name(span_name(&self.method, route));
            }
            let (address, port) = self.server_address();
            server.set_attributes([
                KeyValue::new("http.request.method", method_name(&self.method)),
                KeyValue::new("url.path", self.uri.path().to_string()),
                KeyValue::new("url.scheme", self.scheme),
                KeyValue::new("server.address", address),
                KeyValue::new("server.port", port),
                KeyValue::new("client.address", self.peer.ip().to_string()),
                KeyValue::new("network.peer.address", self.peer.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(self.peer.port())),
                KeyValue::new("network.protocol.version", protocol_version(self.version)),
            ]);
            if let Some(route) = route {
                server.set_attribute(KeyValue::new("http.route", Value::from(route.clone())));
            }
            if method_name(&self.method) == "_OTHER" {
                server.set_attribute(KeyValue::new(
                    "http.request.method_original",
                    self.method.as_str().to_string(),
                ));
            }
        }
        self.server = Some(server);
    }

    /// The server the client addressed: the Host (or absolute URI)
    /// authority, else the local socket.
    fn server_address(&self) -> (String, i64) {
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
            .and_then(|a| a.parse::<http::uri::Authority>().ok());
        match authority {
            Some(a) => {
                let default = if self.scheme == "https" { 443 } else { 80 };
                (
                    a.host().to_string(),
                    i64::from(a.port_u16().unwrap_or(default)),
                )
            }
            None => (self.local.ip().to_string(), i64::from(self.local.port())),
        }
    }
}

/// `{METHOD} {route}`, or the method alone before a route is known.
fn span_name(method: &Method, route: Option<&Arc<str>>) -> String {
    match route {
        Some(r) => format!("{} {r}", method_name(method)),
        None => method_name(method).to_string(),
    }
}

/// The semconv method name: the standard ones, anything else `_OTHER`.
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Reads trace context from request headers.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes trace context into the upstream request's headers.
struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            other => match HeaderName::from_bytes(other.as_bytes()) {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        if let Ok(v) = HeaderValue::try_from(value) {
            self.0.insert(name, v);
        }
    }
}

/// The trace headers the client sent, kept from arrival.
struct Received<'a>(&'a (Option<HeaderValue>, Option<HeaderValue>));

impl Extractor for Received<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let v = match key {
            "traceparent" => self.0 .0.as_ref(),
            "tracestate" => self.0 .1.as_ref(),
            _ => None,
        };
        v.and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}
