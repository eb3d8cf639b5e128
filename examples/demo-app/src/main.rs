//! demo-app: a small HTTP service standing in for a team's app in the
//! quickstart and the benchmarks.
//!
//! `demo-app NAME ADDR [CALL_URL]` serves HTTP/1.1 and h2c on ADDR. `GET /`
//! answers a short text naming the service and echoing what arrived (so the
//! demo can show what the sidecars added). With CALL_URL, `GET /call`
//! makes an outbound call to CALL_URL through `$HTTP_PROXY` (the local
//! sidecar) and includes that answer: a two-service mesh in miniature.
//! `GET /bench` answers a fixed 13-byte body, for load tests.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Clone)]
struct App {
    name: &'static str,
    call: Option<String>,
    proxy: Option<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: demo-app NAME ADDR [CALL_URL]");
        std::process::exit(2);
    }
    let addr: SocketAddr = match args[2].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo-app: bad address {}: {e}", args[2]);
            std::process::exit(2);
        }
    };
    let app = App {
        name: Box::leak(args[1].clone().into_boxed_str()),
        call: args.get(3).cloned(),
        proxy: std::env::var("HTTP_PROXY").ok(),
    };
    let threads = std::env::var("DEMO_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(serve(addr, app));
}

async fn serve(addr: SocketAddr, app: App) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-app {}: cannot bind {addr}: {e}", app.name);
            std::process::exit(1);
        }
    };
    eprintln!("demo-app {} listening on {addr}", app.name);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, app.clone(), client.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    app: App,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/bench" {
        return Ok(Response::new(Full::new(Bytes::from_static(
            b"hello, world\n",
        ))));
    }
    let mut text = format!("{} answered {} {}\n", app.name, req.method(), req.uri());
    for (k, v) in req.headers() {
        text.push_str(&format!("  {}: {}\n", k, v.to_str().unwrap_or("?")));
    }
    if req.uri().path() == "/call" {
        if let Some(url) = &app.call {
            text.push_str(&format!("{} calls {url}", app.name));
            // Apps propagate trace context and caller identity; the mesh
            // does the rest.
            let forwarded: Vec<(String, String)> = PROPAGATE
                .iter()
                .filter_map(|h| {
                    Some((
                        h.to_string(),
                        req.headers().get(*h)?.to_str().ok()?.to_string(),
                    ))
                })
                .collect();
            match call(&client, url, app.proxy.as_deref(), &forwarded).await {
                Ok((status, body)) => text.push_str(&format!(" -> {status}\n{body}")),
                Err(e) => text.push_str(&format!(" -> failed: {e}\n")),
            }
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut()
        .insert("x-served-by", http::HeaderValue::from_static(app.name));
    Ok(resp)
}

/// Headers an app copies from the request it serves onto the calls it makes.
const PROPAGATE: [&str; 6] = [
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-user",
    "x-canary",
    "b3",
];

/// Calls `url` the way an app behind a sidecar does: through `HTTP_PROXY`.
async fn call(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    proxy: Option<&str>,
    forwarded: &[(String, String)],
) -> Result<(u16, String), String> {
    let target: http::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let host = target.host().unwrap_or("").to_string();
    // Absolute-form to the proxy, as HTTP_PROXY clients do.
    let uri = match proxy {
        Some(p) => {
            let p: http::Uri = p.parse().map_err(|e| format!("bad HTTP_PROXY: {e}"))?;
            let authority = p
                .authority()
                .map(|a| a.as_str())
                .unwrap_or("127.0.0.1:15001")
                .to_string();
            format!(
                "http://{authority}{}",
                target.path_and_query().map_or("/", |p| p.as_str())
            )
        }
        None => url.to_string(),
    };
    let mut req = Request::get(uri).header("host", host);
    for (k, v) in forwarded {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
