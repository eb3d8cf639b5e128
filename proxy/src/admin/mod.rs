//! The admin API, served on the control thread (default `127.0.0.1:9901`).
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /live` | 200 while the process serves this port (Kubernetes liveness) |
//! | `GET /ready` | 200 once every filter is loaded and every listener bound; 503 with the reason (`starting`, `draining`) before that and from the start of a shutdown |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /config` | the effective configuration as JSON |
//! | `GET /filters` | each filter: module, hash, generation, state, last error |
//! | `GET /clusters` | each cluster's endpoints: health, weight, in-flight, latency estimate, ejections |
//! | `PUT /logging?level=debug` | changes the log level at run time |
//! | `POST /reload` | reload the config and filters now; 200 with the new generation, or 400 with why not |
//! | `GET /reload` | the current generation and the last reload error |
//! | `POST /shutdown` | graceful shutdown, as SIGTERM |
//!
//! Nothing here is on the request path; handlers may allocate and format freely.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::server::Shared;

type AdminResponse = Response<Full<Bytes>>;

pub async fn serve(socket: std::net::TcpListener, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin: cannot register the socket: {e}");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    if req.method() == Method::POST && req.uri().path() == "/reload" {
                        return Ok::<_, Infallible>(post_reload(&shared).await);
                    }
                    Ok(route(req, &shared))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> AdminResponse {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => ready(shared),
        (&Method::GET, "/metrics") => metrics(shared),
        (&Method::GET, "/clusters") => {
            let snapshot = shared.snapshot.load();
            match serde_json::to_string_pretty(&crate::upstream::clusters_json(&snapshot.config)) {
                Ok(json) => with_type(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render clusters: {e}\n")),
            }
        }
        (&Method::GET, "/filters") => match serde_json::to_string_pretty(&shared.filters.status_json()) {
            Ok(json) => with_type(StatusCode::OK, "application/json", json),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render filters: {e}\n")),
        },
        (&Method::GET, "/reload") => reload_status(shared),
        (&Method::GET, "/config") => {
            let snapshot = shared.snapshot.load();
            let mut value = serde_json::to_value(&snapshot.config.file).unwrap_or_default();
            if let (Some(obj), Ok(status)) = (value.as_object_mut(), shared.reload_status.lock()) {
                obj.insert("generation".into(), snapshot.generation.into());
                obj.insert("last_reload_error".into(), status.last_error.clone().into());
            }
            match serde_json::to_string_pretty(&value) {
                Ok(json) => with_type(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render the config: {e}\n")),
            }
        }
        (&Method::PUT, "/logging") | (&Method::POST, "/logging") => set_log_level(req.uri().query(), shared),
        (&Method::POST, "/shutdown") => {
            shared.begin_shutdown("admin /shutdown");
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/filters" | "/clusters" | "/reload" | "/shutdown" | "/logging") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown admin endpoint; try /live /ready /metrics /config /filters /clusters /reload /logging /shutdown\n",
        ),
    }
}

/// Draining wins over ready: a shutdown that starts while start-up is
/// finishing (a worker failing) must not be reported ready.
fn ready(shared: &Shared) -> AdminResponse {
    if shared.draining.load(Ordering::Acquire) {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: shutting down, in-flight requests are finishing\n",
        )
    } else if shared.ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: filters are loading or listeners are not bound yet\n",
        )
    }
}

fn metrics(shared: &Shared) -> AdminResponse {
    let mut out = String::with_capacity(16 << 10);
    shared.metrics.render(&mut out);
    shared.filters.render_metrics(&mut out);
    crate::upstream::render_metrics(&shared.snapshot.load().config, &mut out);
    let uptime = shared.started.elapsed().as_secs_f64();
    out.push_str("# HELP wasp_uptime_seconds Seconds since the process started.\n");
    out.push_str("# TYPE wasp_uptime_seconds gauge\n");
    out.push_str(&format!("wasp_uptime_seconds {uptime:.3}\n"));
    out.push_str("# HELP wasp_reload_failures_total Reloads rejected (config or filter errors).\n");
    out.push_str("# TYPE wasp_reload_failures_total counter\n");
    out.push_str(&format!(
        "wasp_reload_failures_total {}\n",
        shared.reload_failures.load(Ordering::Relaxed)
    ));
    out.push_str("# HELP wasp_config_generation The snapshot generation serving new requests.\n");
    out.push_str("# TYPE wasp_config_generation gauge\n");
    out.push_str(&format!(
        "wasp_config_generation {}\n",
        shared.snapshot.load().generation
    ));
    out.push_str("# HELP wasp_build_info Build information; the value is always 1.\n");
    out.push_str("# TYPE wasp_build_info gauge\n");
    out.push_str(&format!(
        "wasp_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    ));
    crate::telemetry::process::render(&mut out);
    with_type(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        out,
    )
}

/// Reloads now and answers with the outcome.
async fn post_reload(shared: &Shared) -> AdminResponse {
    let Some(reloads) = shared.reload.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload is not running yet\n",
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if reloads.send(crate::reload::Trigger::Admin(tx)).is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "reload is not running\n");
    }
    match rx.await {
        Ok(Ok(generation)) => text(
            StatusCode::OK,
            &format!("reloaded: generation {generation}\n"),
        ),
        Ok(Err(e)) => text(
            StatusCode::BAD_REQUEST,
            &format!("reload rejected, the previous configuration keeps serving:\n{e}\n"),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "reload was abandoned\n"),
    }
}

fn reload_status(shared: &Shared) -> AdminResponse {
    let generation = shared.snapshot.load().generation;
    let error = shared
        .reload_status
        .lock()
        .ok()
        .and_then(|s| s.last_error.clone());
    let body = serde_json::json!({ "generation": generation, "last_error": error });
    with_type(StatusCode::OK, "application/json", body.to_string())
}

fn set_log_level(query: Option<&str>, shared: &Shared) -> AdminResponse {
    let level = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="));
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "use ?level=error|warn|info|debug|trace (or a tracing filter)\n",
        );
    };
    let Some(handle) = &shared.log_level else {
        return text(
            StatusCode::CONFLICT,
            "log level is not adjustable in this process\n",
        );
    };
    match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(filter) => match handle.reload(filter) {
            Ok(()) => {
                tracing::info!("log level set to {level}");
                text(StatusCode::OK, &format!("log level set to {level}\n"))
            }
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot set log level: {e}\n"),
            ),
        },
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            &format!("invalid level \"{level}\": {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> AdminResponse {
    with_type(status, "text/plain; charset=utf-8", body.to_string())
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
