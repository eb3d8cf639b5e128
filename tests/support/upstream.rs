//! Real upstream servers for the tests: hyper (HTTP/1.1 and h2c on one
//! port) with a few behaviours chosen by path, and a raw TCP server that
//! misbehaves on purpose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// HTTP requests served.
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestUpstream {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (acc, reqs) = (accepted.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        serve(name, req)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            name,
            accepted,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn serve(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let version = req.version();
    let host = req.headers().get("host").cloned();
    let mut seen = String::new();
    for (k, v) in req.headers() {
        seen.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
    }
    let mut resp = if path == "/slow" {
        let ms: u64 = query
            .strip_prefix("ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::new(full(format!("slow {ms}ms done\n")))
    } else if path == "/echo" {
        // Streams the request body straight back.
        let (_, body) = req.into_parts();
        Response::new(body.boxed())
    } else if path == "/count" {
        let mut n = 0usize;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        Response::new(full(format!("{n}")))
    } else if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        return Ok(r);
    } else if path == "/grpc" {
        // gRPC-shaped: echo the message, then trailers.
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "echoed".parse().unwrap());
        let frames = vec![
            Ok::<_, hyper::Error>(Frame::data(body)),
            Ok(Frame::trailers(trailers)),
        ];
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    } else if path == "/check" {
        // An authorization service for callout tests: alice may, others may not.
        let user = req
            .headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut r = Response::new(full(format!("ok-{user}")));
        if user != "alice" {
            *r.status_mut() = StatusCode::FORBIDDEN;
        }
        r
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("status {code}\n")));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    } else {
        Response::new(full(seen))
    };
    let h = resp.headers_mut();
    h.insert("x-upstream", name.parse().unwrap());
    h.insert("x-seen-path", req_path_header(&path, &query));
    h.insert("x-seen-version", format!("{version:?}").parse().unwrap());
    if let Some(host) = host {
        h.insert("x-seen-host", host);
    }
    Ok(resp)
}

fn req_path_header(path: &str, query: &str) -> http::HeaderValue {
    let v = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    v.parse()
        .unwrap_or_else(|_| http::HeaderValue::from_static("?"))
}

/// A TCP server that accepts, reads the request, and closes without answering.
pub async fn rude_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                drop(s);
            });
        }
    });
    (addr, task)
}
