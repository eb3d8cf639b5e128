//! The admin API, served on the control thread (default `127.0.0.1:9901`),
//! and the optional probes address (`[admin] probes`).
//!
//! | endpoint | class | what |
//! |---|---|---|
//! | `GET /live` | open | 200 while the process serves this port (Kubernetes liveness) |
//! | `GET /ready` | open | 200 once every filter is loaded and every listener bound; 503 with the reason (`starting`, `draining`) before that and from the start of a shutdown |
//! | `GET /metrics` | open | Prometheus text exposition |
//! | `GET /config` | guarded read | the effective configuration as JSON (after `${VAR}` substitution; `[admin] token` redacted) |
//! | `GET /filters` | guarded read | each filter: module, hash, generation, state, last error |
//! | `GET /clusters` | guarded read | each cluster's endpoints: health, weight, in-flight, latency estimate, ejections |
//! | `GET /reload` | guarded read | the current generation and the last reload error |
//! | `PUT /logging?level=debug` | change | changes the log level at run time |
//! | `POST /reload` | change | reload the config and filters now; 200 with the new generation, or 400 with why not |
//! | `POST /shutdown` | change | graceful shutdown, as SIGTERM |
//!
//! Who may call what is decided in [`access`]; a refusal is a 403 with
//! `x-wasp-error: admin_forbidden` and the reason. The probes address serves
//! the open endpoints only. Each address takes at most
//! [`MAX_CONNECTIONS`] connections, [`MAX_CONNECTIONS_PER_PEER`] from one
//! non-loopback peer (more are closed at once), a request head
//! must arrive within [`HEADER_TIMEOUT`] (idle keep-alive included), no
//! connection outlives [`CONNECTION_LIFETIME`], and accept errors (EMFILE)
//! back off instead of spinning the control thread.
//!
//! Nothing here is on the request path; handlers may allocate and format freely.

pub mod access;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::config::AdminConfig;
use crate::errors::ErrorCode;
use crate::filter::FilterRuntime;
use crate::lifecycle::Lifecycle;
use crate::reload::ReloadHandle;
use crate::snapshot::Snapshots;
use crate::telemetry::logging::LevelHandle;
use crate::telemetry::Metrics;

/// What the admin API reads and acts on.
pub struct Context {
    pub snapshots: Arc<Snapshots>,
    pub lifecycle: Arc<Lifecycle>,
    pub reload: Arc<ReloadHandle>,
    /// The Wasm engine: filter metrics and status.
    pub filters: Arc<FilterRuntime>,
    pub metrics: Arc<Metrics>,
    pub log_level: Option<LevelHandle>,
}

type AdminResponse = Response<Full<Bytes>>;

/// Open connections per admin address; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Open connections one non-loopback peer may hold per admin address, so
/// one pod cannot take every slot of a probes port the kubelet needs.
/// Loopback peers (this host's own tools) share only the global limit.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Time to receive a request head, including idle time between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest any admin connection lives (a slow reader of `/metrics`, a
/// body that never ends).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Accept-error backoff bounds.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The bound admin sockets, made before anything starts so a taken port is
/// a clean start-up error.
#[derive(Debug)]
pub struct Sockets {
    admin: std::net::TcpListener,
    probes: Option<std::net::TcpListener>,
}

/// Binds `[admin] bind` and, when set, `[admin] probes`.
pub fn bind(config: &AdminConfig) -> anyhow::Result<Sockets> {
    let open = |addr: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
        let s = std::net::TcpListener::bind(addr)
            .with_context(|| format!("admin: cannot bind {what} {addr}"))?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    Ok(Sockets {
        admin: open(config.bind, "[admin] bind")?,
        probes: config
            .probes
            .map(|p| open(p, "[admin] probes"))
            .transpose()?,
    })
}

/// What `wasp check` and start-up warn about: guarded endpoints on a
/// non-loopback address with no token (they refuse every remote caller, so
/// the address is only useful for probes, which `probes` serves alone).
pub fn exposure_warnings(config: &AdminConfig) -> Vec<String> {
    let mut out = Vec::new();
    if config.token.is_none() && !config.bind.ip().to_canonical().is_loopback() {
        out.push(format!(
            "[admin] bind = \"{}\" is reachable beyond loopback and no [admin] token is set: /shutdown, /reload, /logging, /config, /filters and /clusters refuse every non-loopback caller; keep bind on 127.0.0.1 and set [admin] probes = \"0.0.0.0:15021\" for the kubelet and Prometheus, or set [admin] token = \"${{WASP_ADMIN_TOKEN}}\"",
            config.bind
        ));
    }
    out
}

/// Serves the admin address (and the probes address) until aborted.
pub async fn serve(sockets: Sockets, shared: Arc<Context>) {
    if let Some(p) = sockets.probes {
        tokio::spawn(accept_loop(p, shared.clone(), true));
    }
    accept_loop(sockets.admin, shared, false).await;
}

async fn accept_loop(socket: std::net::TcpListener, shared: Arc<Context>, probes_only: bool) {
    let what = if probes_only { "admin probes" } else { "admin" };
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{what}: cannot register the socket: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_peer: PeerCounts = Arc::default();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) => {
                // EMFILE and friends do not clear by retrying at once.
                if backoff == ACCEPT_BACKOFF_MIN {
                    tracing::warn!("{what}: accept failed, backing off: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // One peer (say, any pod reaching a probes port on 0.0.0.0) may not
        // hold every slot: the kubelet's probes must still get in.
        let Some(per_peer) = PeerSlot::take(&per_peer, peer.ip()) else {
            tracing::debug!(%peer, "{what}: {MAX_CONNECTIONS_PER_PEER} connections open from this peer; closing a new one");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "{what}: {MAX_CONNECTIONS} connections open; closing a new one");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = (slot, per_peer);
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, probes_only, &shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

/// Open admin connections by peer address.
type PeerCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One peer's share of the admin connections, given back on drop.
struct PeerSlot {
    counts: PeerCounts,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(counts: &PeerCounts, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER && !ip.to_canonical().is_loopback() {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    probes_only: bool,
    shared: &Context,
) -> AdminResponse {
    let class = access::classify(req.method(), req.uri().path());
    if probes_only && class != access::Class::Open {
        return error(
            ErrorCode::AdminNotFound,
            "this is the probes address: it serves only /live, /ready and /metrics",
        );
    }
    let token = shared.snapshots.load().config.admin.token.clone();
    if let Err(refusal) = access::check(class, peer, req.uri(), req.headers(), token.as_deref()) {
        // Anyone who reaches the port can cause these: at most one a
        // second at info, the rest at debug.
        if refusal_log_allowed(shared.lifecycle.started().elapsed().as_secs()) {
            tracing::info!(%peer, method = %req.method(), path = req.uri().path(), "admin: refused: {}", refusal.0);
        } else {
            tracing::debug!(%peer, method = %req.method(), path = req.uri().path(), "admin: refused: {}", refusal.0);
        }
        return error(
            ErrorCode::AdminForbidden,
            &format!("forbidden: {}", refusal.0),
        );
    }
    if req.method() == Method::POST && req.uri().path() == "/reload" {
        return post_reload(shared).await;
    }
    route(req, shared)
}

fn route(req: Request<Incoming>, shared: &Context) -> AdminResponse {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => ready(shared),
        (&Method::GET, "/metrics") => metrics(shared),
        (&Method::GET, "/clusters") => {
            let snapshot = shared.snapshots.load();
            match serde_json::to_string_pretty(&crate::upstream::clusters_json(&snapshot.clusters)) {
                Ok(json) => with_type(StatusCode::OK, "application/json", json),
                Err(e) => error(ErrorCode::AdminInternal, &format!("cannot render clusters: {e}")),
            }
        }
        (&Method::GET, "/filters") => match serde_json::to_string_pretty(&shared.filters.status_json()) {
            Ok(json) => with_type(StatusCode::OK, "application/json", json),
            Err(e) => error(ErrorCode::AdminInternal, &format!("cannot render filters: {e}")),
        },
        (&Method::GET, "/reload") => reload_status(shared),
        (&Method::GET, "/config") => {
            let snapshot = shared.snapshots.load();
            let mut value = serde_json::to_value(&snapshot.config.file).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                let status = shared.reload.status();
                obj.insert("generation".into(), snapshot.generation.into());
                obj.insert("last_reload_error".into(), status.last_error.clone().into());
            }
            match serde_json::to_string_pretty(&value) {
                Ok(json) => with_type(StatusCode::OK, "application/json", json),
                Err(e) => error(ErrorCode::AdminInternal, &format!("cannot render the config: {e}")),
            }
        }
        (&Method::PUT, "/logging") | (&Method::POST, "/logging") => set_log_level(req.uri().query(), shared),
        (&Method::POST, "/shutdown") => {
            shared.lifecycle.begin_shutdown("admin /shutdown");
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/filters" | "/clusters" | "/reload" | "/shutdown" | "/logging") => {
            error(ErrorCode::AdminMethodNotAllowed, "method not allowed")
        }
        _ => error(
            ErrorCode::AdminNotFound,
            "unknown admin endpoint; try /live /ready /metrics /config /filters /clusters /reload /logging /shutdown",
        ),
    }
}

/// Draining wins over ready: a shutdown that starts while start-up is
/// finishing (a worker failing) must not be reported ready.
fn ready(shared: &Context) -> AdminResponse {
    if shared.lifecycle.is_draining() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: shutting down, in-flight requests are finishing\n",
        )
    } else if shared.lifecycle.is_ready() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: filters are loading or listeners are not bound yet\n",
        )
    }
}

fn metrics(shared: &Context) -> AdminResponse {
    let mut out = String::with_capacity(16 << 10);
    shared.metrics.render(&mut out);
    shared.filters.render_metrics(&mut out);
    crate::upstream::render_metrics(&shared.snapshots.load().clusters, &mut out);
    let uptime = shared.lifecycle.started().elapsed().as_secs_f64();
    out.push_str("# HELP wasp_uptime_seconds Seconds since the process started.\n");
    out.push_str("# TYPE wasp_uptime_seconds gauge\n");
    out.push_str(&format!("wasp_uptime_seconds {uptime:.3}\n"));
    out.push_str("# HELP wasp_reload_failures_total Reloads rejected (config or filter errors).\n");
    out.push_str("# TYPE wasp_reload_failures_total counter\n");
    out.push_str(&format!(
        "wasp_reload_failures_total {}\n",
        shared.reload.failures()
    ));
    out.push_str("# HELP wasp_config_generation The snapshot generation serving new requests.\n");
    out.push_str("# TYPE wasp_config_generation gauge\n");
    out.push_str(&format!(
        "wasp_config_generation {}\n",
        shared.snapshots.load().generation
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
async fn post_reload(shared: &Context) -> AdminResponse {
    let Some(reloads) = shared.reload.requests() else {
        return error(ErrorCode::AdminUnavailable, "reload is not running yet");
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if reloads.send(crate::reload::Trigger::Admin(tx)).is_err() {
        return error(ErrorCode::AdminUnavailable, "reload is not running");
    }
    match rx.await {
        Ok(Ok(generation)) => text(
            StatusCode::OK,
            &format!("reloaded: generation {generation}\n"),
        ),
        Ok(Err(e)) => error(
            ErrorCode::ReloadRejected,
            &format!("reload rejected, the previous configuration keeps serving:\n{e}"),
        ),
        Err(_) => error(ErrorCode::AdminUnavailable, "reload was abandoned"),
    }
}

fn reload_status(shared: &Context) -> AdminResponse {
    let generation = shared.snapshots.load().generation;
    let error = shared.reload.status().last_error;
    let body = serde_json::json!({ "generation": generation, "last_error": error });
    with_type(StatusCode::OK, "application/json", body.to_string())
}

fn set_log_level(query: Option<&str>, shared: &Context) -> AdminResponse {
    let level = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="))
        .and_then(percent_decode);
    let Some(level) = level.as_deref() else {
        return error(
            ErrorCode::AdminBadRequest,
            "use ?level=error|warn|info|debug|trace (or a tracing filter)",
        );
    };
    let Some(handle) = &shared.log_level else {
        return error(
            ErrorCode::AdminUnavailable,
            "log level is not adjustable in this process",
        );
    };
    match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(filter) => match handle.reload(filter) {
            Ok(()) => {
                tracing::info!("log level set to {level}");
                text(StatusCode::OK, &format!("log level set to {level}\n"))
            }
            Err(e) => error(
                ErrorCode::AdminInternal,
                &format!("cannot set log level: {e}"),
            ),
        },
        Err(e) => error(
            ErrorCode::AdminBadRequest,
            &format!("invalid level \"{level}\": {e}"),
        ),
    }
}

/// True at most once per second of process time.
fn refusal_log_allowed(now_secs: u64) -> bool {
    static LAST: AtomicU64 = AtomicU64::new(u64::MAX);
    let last = LAST.load(Ordering::Relaxed);
    last != now_secs
        && LAST
            .compare_exchange(last, now_secs, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// `%XX` and `+` as a query string encodes them (`warn%2Cwasp%3Ddebug`);
/// `None` for a broken escape or text that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// An answer the admin API refuses with (see [`ErrorCode::response`]).
fn error(code: ErrorCode, reason: &str) -> AdminResponse {
    code.response::<Bytes>(reason).map(Full::new)
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

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("debug").as_deref(), Some("debug"));
        assert_eq!(
            percent_decode("warn%2Cwasp%3Ddebug").as_deref(),
            Some("warn,wasp=debug")
        );
        for broken in ["%", "%2", "%zz", "%+1", "%ff%fe", "a%"] {
            assert_eq!(percent_decode(broken), None, "{broken}");
        }
    }
}
