//! The request path as named phases, in the order a request meets them:
//!
//! 1. [`precheck`]: framing the proxy refuses, the stream's deadlines, the
//!    listener's allow list;
//! 2. [`request_filters`]: the request-header filters, before routing so
//!    they can steer it; which filters is decided before, by
//!    [`client_chain`] (the route the request matches as sent, Envoy's
//!    route cache), and [`route`] refuses a final route whose filters did
//!    not run;
//! 3. [`route`]: the route, its allow list, the cluster (or a filter's
//!    override); [`hold_request`] then holds a head whose body a filter
//!    may resize until its first chunk went through the filters, before
//!    any upstream slot is taken;
//! 4. the upstream request: [`admit_and_pick`] (circuit breakers, then the
//!    balancer), [`rewrite`] (URI, hop-by-hop and forwarding headers),
//!    [`request_body`] (kept whole for a replay, or streamed through the
//!    filters), [`send`] (tries and retries by `upstream`, under the
//!    stream's deadlines), [`switch_protocols`] on a 101;
//! 5. [`respond`]: the response-header filters and the response body's
//!    wrappers.
//!
//! Each phase returns `Result<_, ProxyError>`; [`forward`] chains them
//! with `?` and leaves turning a failure into the response to its caller
//! (`super::serve`). A filter's own answer is not a failure: it ends the
//! path with `Ok`. The phases are generic over the client's body type, so
//! they run in unit tests on hand-built requests (below).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;

use super::body::{self, RequestBody, Tracked};
use super::deadline::{Cut, StreamClock, Timed, Touching};
use super::filtered::{Fact, FilteredBody, Framing, HeaderPhase, SharedChain, Side};
use super::{error, headers, upgrade, Ctx, ProxyError, RequestLog, REQUEST_ID};
use crate::filter::{FilterReply, Verdict};
use crate::route::Route;
use crate::snapshot::Chains;
use crate::telemetry::trace::RequestTrace;
use crate::upstream::balance::PickContext;
use crate::upstream::{
    Admission, BoxError, Picked, ProxyBody, Replay, ResponseBody, SendError, Upstream,
};

pub(crate) const VIA_H1: &str = "1.1 wasp";
const VIA_H2: &str = "2.0 wasp";

/// A routed request: where it goes.
pub(super) struct Routed<'a> {
    pub route: &'a Route,
    pub upstream: &'a Upstream,
    /// The cluster's id (`route::PASSTHROUGH` for the built-in one).
    pub cluster: usize,
    /// The authority the client addressed (empty when none).
    pub host: String,
}

/// The request path from the client's request to the response to send
/// back (the upstream's, or a filter's), or the failure to answer.
pub(super) async fn forward<B>(
    mut req: Request<B>,
    ctx: &Ctx<'_>,
    chain: Option<&SharedChain>,
    mut trace: Option<&mut RequestTrace>,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    precheck(&req, ctx, log)?;
    let clock = log.clock.clone();
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let via = if req.version() == Version::HTTP_2 {
        VIA_H2
    } else {
        VIA_H1
    };
    let (mut parts, body) = req.into_parts();
    if let Some(answer) = request_filters(&mut parts, body.is_end_stream(), chain).await {
        return Ok(answer);
    }
    let routed = route(&mut parts, ctx, chain, log)?;
    // The route and cluster are known now: body callbacks run while the
    // head is held (below) must see them, as they do on a streamed body.
    if let Some(chain) = chain {
        chain.record(Fact::Route(
            routed.route.name.clone(),
            routed.upstream.name.clone(),
        ));
    }
    // Before the cluster admission: a client that is slow to send the body
    // its head waits for must not hold an upstream slot meanwhile (as
    // Envoy's router takes none until the decoder filters let the headers
    // go).
    let body = match hold_request(body, &mut parts, ctx, chain, clock.clone(), upgrade).await {
        Ok(body) => body,
        // A filter answered (or failed) on the body while the head was
        // held for it.
        Err(e) => return answer_or(e, chain).await,
    };
    let (admission, picked) = admit_and_pick(&routed, &parts, ctx, chain).await?;
    rewrite(&mut parts, &routed, &picked, ctx, upgrade, via)?;
    let (body, kept) =
        request_body(body, &parts, &routed, ctx, chain, clock.clone(), upgrade).await?;
    if let Some(t) = &mut trace {
        // The client span's context goes upstream as `traceparent`.
        t.upstream_start(
            &mut parts.headers,
            &routed.route.name,
            &routed.upstream.name,
            picked.addr,
            &parts.uri,
        );
    }
    let head_request = parts.method == http::Method::HEAD;
    // The endpoint the response came from (a retry may have moved on from
    // the one picked), for errors while its body is held to name.
    let (sent, endpoint) = send(&routed, picked, parts, body, kept, clock.as_deref(), chain).await;
    if let Some(t) = &mut trace {
        t.upstream_end(
            sent.as_ref()
                .map(|r| r.status().as_u16())
                .map_err(|e| e.code().as_str()),
        );
    }
    let mut resp = match sent {
        Ok(resp) => resp,
        // A filter that answered mid-body aborted the upstream request.
        Err(e) => return answer_or(e, chain).await,
    };
    // Envoy stops request_timeout once the response starts: a
    // bidirectional stream or an upload answered early is timed by
    // stream_idle_timeout alone from here.
    if let Some(clock) = &clock {
        clock.response_started();
    }
    let exchange = Exchange {
        switching: switch_protocols(&mut resp, downstream_upgrade, ctx),
        via,
        head_request,
        cluster: &routed.upstream.name,
        endpoint,
    };
    respond(resp, admission, exchange, ctx, chain, clock).await
}

/// A failure on a request body: the answer of the filter that made it
/// fail (kept by the chain), else the failure itself.
async fn answer_or(
    e: ProxyError,
    chain: Option<&SharedChain>,
) -> Result<Response<ProxyBody>, ProxyError> {
    match chain.and_then(SharedChain::take_local) {
        Some(local) => Ok(filter_answer(local, chain).await),
        None => Err(e),
    }
}

/// Phase 1: shapes of request the proxy refuses, the stream's deadlines,
/// and the listener's allow list.
pub(super) fn precheck<B>(
    req: &Request<B>,
    ctx: &Ctx<'_>,
    log: &mut RequestLog,
) -> Result<(), ProxyError> {
    let listener = ctx.listener;
    check_framing(req, listener.limits.max_body_bytes)?;
    log.clock = StreamClock::new(
        listener.limits.stream_idle_timeout,
        listener.limits.request_timeout,
    );
    match &listener.allow {
        Some(allow) if !allow.permits(ctx.principal.map(|p| &**p)) => {
            Err(ProxyError::UnauthorizedPeer {
                scope: format!("listener \"{}\"", listener.name),
                principal: ctx.principal.cloned(),
            })
        }
        _ => Ok(()),
    }
}

/// Phase 2: the request-header filters; `Some` is a filter's own answer.
pub(super) async fn request_filters(
    parts: &mut http::request::Parts,
    end_of_stream: bool,
    chain: Option<&SharedChain>,
) -> Option<Response<ProxyBody>> {
    // The chain's future is large: only a phase that must wait boxes it
    // (`HeaderPhase`), so neither an empty chain's request future (moved
    // whole) nor a pipeline's common path carries or allocates it.
    // Matched here, not in an `async fn` of `HeaderPhase`: a verdict held
    // in a future's state would enlarge every request's future.
    let verdict = match chain?.request_headers_phase(parts, end_of_stream) {
        HeaderPhase::Done(v) => v,
        HeaderPhase::Later(rest) => rest.await,
    };
    match verdict? {
        Verdict::Respond(resp) => Some(Box::pin(filter_answer(resp, chain)).await),
        _ => None,
    }
}

/// Before phase 2: the filter chain of the route the request matches as
/// the client sent it (Envoy's route cache), the listener's when none
/// does. It runs every filter phase of the request, even if the filters
/// move the request to another route (see [`route`]). When routes choose
/// filters, the path and host are normalised first ([`normalize`]), so
/// one request spelled two ways cannot reach two chains.
pub(super) fn client_chain<B>(
    req: &mut Request<B>,
    ctx: &Ctx<'_>,
) -> Result<Option<usize>, ProxyError> {
    let listener = ctx.listener;
    if !listener.chains.per_route {
        return Ok(None);
    }
    let mut uri = std::mem::take(req.uri_mut());
    let normalized = normalize(&mut uri, req.headers_mut());
    *req.uri_mut() = uri;
    normalized?;
    let host = authority(req.uri(), req.headers()).unwrap_or_default();
    Ok(listener
        .routes
        .find(&host, req.uri().path(), req.method(), req.headers())
        .map(|(i, _)| i))
}

/// The request's path and host as the routes compare them, written back
/// into the request that goes upstream (`route::normalize`): dot segments
/// removed, slashes merged, unreserved escapes decoded, one trailing host
/// dot dropped; an encoded separator or a path above the root is a 400.
pub(super) fn normalize(uri: &mut Uri, headers: &mut http::HeaderMap) -> Result<(), ProxyError> {
    use crate::route::normalize;
    let bad = |what: String| ProxyError::BadRequest(format!("{what}: refused before routing"));
    let path = normalize::path(uri.path()).map_err(|e| bad(e.to_string()))?;
    let path = match path {
        std::borrow::Cow::Owned(p) => Some(p),
        std::borrow::Cow::Borrowed(_) => None,
    };
    let authority = uri.authority().and_then(|a| {
        let h = normalize::host(a.as_str());
        (h.len() != a.as_str().len()).then(|| h.into_owned())
    });
    if path.is_some() || authority.is_some() {
        let mut parts = std::mem::take(uri).into_parts();
        if let Some(p) = path {
            let query = parts
                .path_and_query
                .as_ref()
                .and_then(|pq| pq.query())
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            parts.path_and_query = Some(
                format!("{p}{query}")
                    .parse()
                    .map_err(|e| bad(format!("the normalised path: {e}")))?,
            );
        }
        if let Some(a) = authority {
            parts.authority = Some(
                a.parse()
                    .map_err(|e| bad(format!("the normalised authority: {e}")))?,
            );
        }
        *uri = Uri::from_parts(parts).map_err(|e| bad(format!("the normalised URI: {e}")))?;
    }
    let host = headers.get(header::HOST).and_then(|h| {
        let h = h.to_str().ok()?;
        let normal = normalize::host(h);
        (normal.len() != h.len()).then(|| HeaderValue::from_str(&normal).ok())?
    });
    if let Some(h) = host {
        headers.insert(header::HOST, h);
    }
    Ok(())
}

/// A filter's own answer ([`FilterReply`]) goes back through the response
/// callbacks (reverse pipeline order, the answering filter's included) like
/// an upstream's answer, as Envoy runs its encoder filters on a local reply;
/// an answer the proxy made for a failure goes out as made. An answer made
/// by a response callback on it goes out as made (no callback runs on an
/// answer to an answer). The body is run through whole and sent with its
/// length.
pub(super) async fn filter_answer(
    resp: Response<Bytes>,
    chain: Option<&SharedChain>,
) -> Response<ProxyBody> {
    let Some(chain) = chain.filter(|_| resp.extensions().get::<FilterReply>().is_some()) else {
        return error::boxed(resp);
    };
    let (mut parts, body) = resp.into_parts();
    let no_body = body.is_empty();
    if let Some(Verdict::Respond(again)) = chain.response_headers(&mut parts, no_body).await {
        return error::boxed(again);
    }
    // The callbacks may have changed the length: framing from the body.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    let body = if no_body {
        body
    } else {
        let filtered = FilteredBody::new(
            http_body_util::Full::new(body),
            chain.clone(),
            Side::Response,
        );
        match filtered.collect().await {
            Ok(collected) => collected.to_bytes(),
            // A body callback that answered replaces the answer (its own
            // goes out as made); only a failure is a 503.
            Err(e) => {
                return match chain.take_local() {
                    Some(again) => error::boxed(again),
                    None => error::boxed(crate::errors::ErrorCode::FilterFailed.response(
                        &format!("a filter failed on the body of a local response: {e}"),
                    )),
                }
            }
        }
    };
    Response::from_parts(parts, error::boxed(Response::new(body)).into_body())
}

/// Phase 3: the route, who may use it, and the cluster it sends to.
pub(super) fn route<'c>(
    parts: &mut http::request::Parts,
    ctx: &Ctx<'c>,
    chain: Option<&SharedChain>,
    log: &mut RequestLog,
) -> Result<Routed<'c>, ProxyError> {
    let listener = ctx.listener;
    if listener.chains.per_route {
        // Again: a filter may have set a path the client could not send.
        normalize(&mut parts.uri, &mut parts.headers)?;
    }
    let host = authority(&parts.uri, &parts.headers).unwrap_or_default();
    let (index, found) =
        match listener
            .routes
            .find(&host, parts.uri.path(), &parts.method, &parts.headers)
        {
            Some((i, route)) => (Some(i), Some(route)),
            // Captured: what no route claims goes where the app sent it.
            None => (None, ctx.original_dst.and(listener.passthrough.as_ref())),
        };
    // Nothing to forward: no filter chain is skipped by answering 404.
    let Some(route) = found else {
        return Err(ProxyError::NoRoute {
            listener: listener.name.to_string(),
            host,
            path: parts.uri.path().to_string(),
        });
    };
    // A filter that moved the request to another route must not have let
    // it skip that route's filters (e.g. the authz a public route lacks).
    let ran = listener.chains.of(log.client_route);
    let wanted = listener.chains.of(index);
    if !Chains::covers(ran, wanted) {
        return Err(ProxyError::RerouteDenied {
            route: route.name.to_string(),
            missing: Chains::missing(ran, wanted).join(", "),
        });
    }
    log.route = Some(route.name.clone());
    if let Some(allow) = &route.allow {
        if !allow.permits(ctx.principal.map(|p| &**p)) {
            return Err(ProxyError::UnauthorizedPeer {
                scope: format!("route \"{}\"", route.name),
                principal: ctx.principal.cloned(),
            });
        }
    }
    let mut cluster_id = route.pick_cluster(rand::random());
    // A filter may pick the cluster (e.g. a canary router).
    if let Some(name) = chain.and_then(|c| c.with(|c| c.property("wasp.cluster")).flatten()) {
        let name = String::from_utf8_lossy(&name);
        let picked = ctx
            .snapshot
            .cluster_id(&name)
            .ok_or_else(|| ProxyError::UnknownCluster(name.to_string()))?;
        // A cluster of another route: the filter must not have let the
        // request skip the filters of the routes that send there.
        if listener.chains.per_route && !route.clusters().contains(&picked) {
            let wanted = listener.chains.of_cluster(picked);
            let ran = listener.chains.of(log.client_route);
            if !wanted.iter().all(|w| ran.contains(w)) {
                return Err(ProxyError::ClusterDenied {
                    cluster: name.to_string(),
                    missing: Chains::missing(ran, wanted).join(", "),
                });
            }
        }
        cluster_id = picked;
    }
    let upstream = ctx
        .upstreams
        .get(cluster_id)
        .ok_or_else(|| ProxyError::UnknownCluster(cluster_id.to_string()))?;
    log.cluster = Some(upstream.name.clone());
    log.stats = route
        .stats
        .iter()
        .find(|(c, _)| *c == cluster_id)
        .map(|(_, s)| s.clone());
    Ok(Routed {
        route,
        upstream,
        cluster: cluster_id,
        host,
    })
}

/// Phase 4a: the cluster's circuit breakers, then the balancer (hash key
/// from the request). The admission is held until the response ends.
pub(super) async fn admit_and_pick(
    routed: &Routed<'_>,
    parts: &http::request::Parts,
    ctx: &Ctx<'_>,
    chain: Option<&SharedChain>,
) -> Result<(Admission, Picked), ProxyError> {
    let upstream = routed.upstream;
    let admission = upstream.admit().ok_or_else(|| {
        ProxyError::Overflow(format!(
            "cluster \"{}\" is at its request limits (limits.max_requests / max_pending)",
            upstream.name
        ))
    })?;
    let mut key_buf = [0u8; 16];
    let hash_key = upstream
        .state
        .hash_key(&parts.headers, ctx.peer.ip(), &mut key_buf);
    let picked = if routed.cluster == crate::route::PASSTHROUGH {
        // The built-in cluster's one endpoint: the original destination.
        ctx.original_dst.map(|dst| upstream.direct(dst))
    } else {
        upstream.pick_first(&PickContext { hash_key }).await
    };
    let picked = picked.ok_or_else(|| ProxyError::NoEndpoint(upstream.name.to_string()))?;
    if let Some(chain) = chain {
        chain.record(Fact::Upstream(picked.addr));
    }
    Ok((admission, picked))
}

/// Phase 4b: the upstream request's head, rewritten in place: the
/// endpoint's URI with the route's path, no hop-by-hop headers, the Host
/// the upstream expects, forwarding headers, the cluster's protocol.
pub(super) fn rewrite(
    parts: &mut http::request::Parts,
    routed: &Routed<'_>,
    picked: &Picked,
    ctx: &Ctx<'_>,
    upgrade: bool,
    via: &'static str,
) -> Result<(), ProxyError> {
    let route = routed.route;
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(picked.authority());
    uri.path_and_query = match route.rewrite_path(path_and_query) {
        // Unchanged: reuse the parsed value instead of parsing it again.
        std::borrow::Cow::Borrowed(_) => Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        ),
        std::borrow::Cow::Owned(p) => p.parse().ok(),
    };
    parts.uri = Uri::from_parts(uri)
        .map_err(|e| ProxyError::BadRequest(format!("cannot rewrite the path: {e}")))?;
    // `Connection: x-request-id` must not take away the id the logs use
    // (`serve` has made sure there is one).
    let request_id = parts.headers.get(&REQUEST_ID).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(id) = request_id {
        parts.headers.entry(REQUEST_ID).or_insert(id);
    }
    parts.headers.remove(header::EXPECT);
    let host = &routed.host;
    let host_value = match &route.rewrite_host {
        Some(h) => Some(h.clone()),
        // Usually the Host header is already right: keep it as it is.
        None if parts
            .headers
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes() == host.as_bytes()) =>
        {
            None
        }
        None => HeaderValue::from_str(host).ok(),
    };
    if let Some(h) = host_value {
        parts.headers.insert(header::HOST, h);
    }
    let trusted = ctx.listener.trust_forwarded.trusts(ctx.peer.ip());
    match ctx.forwarded_for {
        Some(client) => {
            headers::add_forwarding_for(&mut parts.headers, client, ctx.scheme, via, trusted)
        }
        None => {
            headers::add_forwarding(&mut parts.headers, ctx.peer.ip(), ctx.scheme, via, trusted)
        }
    }
    parts.version = match routed.upstream.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    Ok(())
}

/// Phase 3b: a request body with a declared length that a filter may
/// resize holds its head until its first chunk went through the filters
/// ([`hold_for_body`]), before any upstream slot is taken, within
/// `header_timeout` (as a body read whole for a retry). A request that
/// carries `Expect: 100-continue` is not held: hyper answers the 100 when
/// the body is first polled, and that should stay the upstream
/// connection's doing, once the request has gone there.
pub(super) async fn hold_request<B>(
    body: B,
    parts: &mut http::request::Parts,
    ctx: &Ctx<'_>,
    chain: Option<&SharedChain>,
    clock: Option<Arc<StreamClock>>,
    upgrade: bool,
) -> Result<Incoming<B>, ProxyError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(chain) = chain else {
        return Ok(Incoming::Raw(body));
    };
    let has_body = !upgrade && !body.is_end_stream() && !headers::expects_continue(&parts.headers);
    let Some(declared) = hold_for_body(has_body, &parts.headers, chain, Side::Request) else {
        return Ok(Incoming::Raw(body));
    };
    let limits = &ctx.listener.limits;
    let body = RequestBody::new(body, limits.max_body_bytes, clock);
    let mut filtered = Box::pin(FilteredBody::new(body, chain.clone(), Side::Request));
    let after = limits.header_timeout;
    let framing = tokio::time::timeout(after, filtered.as_mut().prime())
        .await
        .map_err(|_| ProxyError::BodyTimeout { after })?
        .map_err(|e| body::body_error(&*e))?;
    if let Some(n) = headers::reframe(&mut parts.headers, framing, declared) {
        filtered.as_mut().declare(n);
    }
    Ok(Incoming::Held(filtered.boxed_unsync()))
}

/// The client's request body, as [`hold_request`] leaves it.
pub(super) enum Incoming<B> {
    /// Not held: as the client sends it.
    Raw(B),
    /// Held for the filters: their first output is in, the head framed.
    Held(ProxyBody),
}

/// Phase 4c: the body to send, and a copy kept for retries when the route
/// retries and the body is small enough to read whole first (empty bodies
/// are always kept); otherwise it streams through the filters (a body
/// [`hold_request`] held already does).
pub(super) async fn request_body<B>(
    body: Incoming<B>,
    parts: &http::request::Parts,
    routed: &Routed<'_>,
    ctx: &Ctx<'_>,
    chain: Option<&SharedChain>,
    clock: Option<Arc<StreamClock>>,
    upgrade: bool,
) -> Result<(ProxyBody, Option<Bytes>), ProxyError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let body = match body {
        Incoming::Raw(body) => body,
        Incoming::Held(held) => return Ok((held, None)),
    };
    let limits = &ctx.listener.limits;
    let empty = body.is_end_stream() && !upgrade;
    let body = RequestBody::new(body, limits.max_body_bytes, clock);
    let policy = routed.route.retry.as_deref();
    if !body::should_keep_body(policy, parts, empty, upgrade, chain.is_some()) {
        let kept = empty.then(Bytes::new);
        let body = match chain {
            // Not held (no declared length, or `Expect: 100-continue`):
            // a declared length is kept to, and a misfit reported.
            Some(c) => FilteredBody::new(body, c.clone(), Side::Request)
                .declared(headers::declared_length(&parts.headers).filter(|_| !empty && !upgrade))
                .boxed_unsync(),
            None => body.boxed_unsync(),
        };
        return Ok((body, kept));
    }
    // The cluster admission is already held: a client that trickles its
    // body must not keep it for longer than it may take to send a head.
    let after = limits.header_timeout;
    // Boxed: reading a body whole is the rare path; its timer and buffers
    // would otherwise enlarge every request's future.
    let collected = Box::pin(tokio::time::timeout(after, body.collect()))
        .await
        .map_err(|_| ProxyError::BodyTimeout { after })?
        .map_err(|e| body::body_error(&*e))?;
    let bytes = collected.to_bytes();
    let full = http_body_util::Full::new(bytes.clone())
        .map_err(|never| match never {})
        .boxed_unsync();
    Ok((full, Some(bytes)))
}

/// Phase 4d: `upstream` sends (and retries, when `kept` allows a replay)
/// within the route's timeout, while the stream's deadlines run.
pub(super) async fn send(
    routed: &Routed<'_>,
    picked: Picked,
    parts: http::request::Parts,
    body: ProxyBody,
    kept: Option<Bytes>,
    clock: Option<&StreamClock>,
    chain: Option<&SharedChain>,
) -> (
    Result<Response<ResponseBody>, ProxyError>,
    std::net::SocketAddr,
) {
    let (route, upstream) = (routed.route, routed.upstream);
    // The endpoint being tried (a retry moves it), for an idle cut to
    // name. A lock only a retry takes, never contended: the future must
    // stay `Send`, which a `Cell` behind a reference is not.
    let endpoint = std::sync::Mutex::new(picked.addr);
    let replay = Replay::capture(route.retry.as_deref(), &parts, kept).map(Box::new);
    let timeout = crate::config::route_timeout(route.timeout, upstream.timeout);
    let on_retry = |addr| {
        if let Ok(mut e) = endpoint.lock() {
            *e = addr;
        }
        if let Some(c) = chain {
            c.record(Fact::Upstream(addr));
        }
    };
    let request = Request::from_parts(parts, body);
    // Pinned in place and polled by reference: moving the future into
    // `select!` would copy it whole once more.
    let sending = std::pin::pin!(async {
        let sent = upstream
            .send_with_retries(picked, request, replay, timeout, on_retry)
            .await;
        with_conn(sent, chain)
    });
    let tried = || {
        *endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let sent = within_deadlines(sending, clock, &upstream.name, tried).await;
    (sent, tried())
}

/// Runs `work` under the stream's deadlines (`stream_idle_timeout`,
/// `request_timeout`): nothing moving either way while it waits counts as
/// idle. An idle stream whose request body has all arrived is the
/// upstream's doing (504 `upstream_timeout`); one still owed request
/// bytes is the client's (408), as is `request_timeout`.
async fn within_deadlines<F, T, E>(
    work: std::pin::Pin<&mut F>,
    clock: Option<&StreamClock>,
    cluster: &str,
    // The endpoint to name in a 504: read when the cut happens, since a
    // retry may have moved on to another.
    endpoint: impl Fn() -> std::net::SocketAddr,
) -> Result<T, ProxyError>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<ProxyError>,
{
    let Some(clock) = clock else {
        return work.await.map_err(Into::into);
    };
    tokio::select! {
        done = work => done.map_err(Into::into),
        cut = clock.expired() => Err(match cut {
            Cut::Idle(after) if clock.request_body_ended() => ProxyError::UpstreamTimeout {
                cluster: cluster.to_string(),
                addr: endpoint(),
                after,
            },
            cut => ProxyError::Cut(cut),
        }),
    }
}

/// Hands the connection the response came on to the filters
/// (`upstream.*`), or why connecting to the upstream failed
/// (`upstream.transport_failure_reason`): recorded, so a chain out for a
/// header phase gets them when it is back.
fn with_conn(
    sent: Result<Response<ResponseBody>, SendError>,
    chain: Option<&SharedChain>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let Some(c) = chain else {
        return Ok(sent?);
    };
    match &sent {
        Ok(resp) => {
            c.record(Fact::UpstreamConn(resp.body().conn().clone()));
        }
        Err(SendError::Connect { reason, .. } | SendError::Tls { reason, .. }) => {
            c.record(Fact::UpstreamFailure(Box::from(reason.as_str())));
        }
        Err(_) => {}
    }
    Ok(sent?)
}

/// Phase 4e: on a 101 to an upgrade request, joins the two connections
/// into a tunnel. Returns whether the response switches protocols.
pub(super) fn switch_protocols(
    resp: &mut Response<ResponseBody>,
    downstream: Option<OnUpgrade>,
    ctx: &Ctx<'_>,
) -> bool {
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    if let (Some(down), true) = (downstream, switching) {
        ctx.activity.upgraded.store(true, Ordering::Release);
        upgrade::tunnel(down, hyper::upgrade::on(resp), ctx.drain_deadline.clone());
    }
    switching
}

/// Whether to hold a head until its body's first chunk went through the
/// filters, and the length it declares: only a message that has a body
/// (`has_body`) with one declared `content-length`, when a filter of the
/// chain has a body callback for it (so may change its length). Streams
/// without a declared length (chunked, SSE, h2 without one) never wait.
fn hold_for_body(
    has_body: bool,
    head: &http::HeaderMap,
    chain: &SharedChain,
    side: Side,
) -> Option<u64> {
    if !has_body {
        return None;
    }
    let declared = headers::declared_length(head)?;
    chain.has_body_callback(side).then_some(declared)
}

/// What the response phase knows of the exchange it answers.
pub(super) struct Exchange<'a> {
    /// A 101 to an upgrade: the connections become a tunnel.
    pub switching: bool,
    pub via: &'static str,
    /// The request was HEAD: its answer has no body, whatever it declares.
    pub head_request: bool,
    pub cluster: &'a str,
    pub endpoint: std::net::SocketAddr,
}

/// Phase 5: the response on its way back: clean headers, the
/// response-header filters (which may answer instead), and the body's
/// filters, deadlines and the admission it holds until it ends. A body
/// with a declared length that a filter may resize holds the head until
/// its first chunk went through the filters, under the stream's
/// deadlines; the head is then framed by what they made of it
/// (`headers::reframe`).
pub(super) async fn respond<R>(
    resp: Response<R>,
    mut admission: Admission,
    x: Exchange<'_>,
    ctx: &Ctx<'_>,
    chain: Option<&SharedChain>,
    clock: Option<Arc<StreamClock>>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    R: Body<Data = Bytes> + Send + 'static,
    R::Error: Into<BoxError>,
{
    let switching = x.switching;
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    headers::append_via(&mut parts.headers, x.via);
    // The request counts against max_requests until its response ends.
    admission.headers_received();
    let body = Tracked::new(body, move |_| drop(admission));
    let body = match chain {
        Some(chain) if !switching => {
            let end = body.is_end_stream();
            // Boxed only if it waits, as in `request_filters`.
            let verdict = match chain.response_headers_phase(&mut parts, end) {
                HeaderPhase::Done(v) => v,
                HeaderPhase::Later(rest) => rest.await,
            };
            if let Some(Verdict::Respond(resp)) = verdict {
                return Ok(error::boxed(resp));
            }
            let status = parts.status;
            let has_body = !end
                && !x.head_request
                && !status.is_informational()
                && status != http::StatusCode::NO_CONTENT
                && status != http::StatusCode::NOT_MODIFIED;
            // The upstream's frames keep the stream alive even while a
            // filter buffers them.
            let body = Touching::new(body, clock.clone());
            let filtered = FilteredBody::new(body, chain.clone(), Side::Response);
            match hold_for_body(has_body, &parts.headers, chain, Side::Response) {
                // Not held (no filter exports a body callback for it): the
                // declared length still caps what goes out, so even a body
                // resized after all could not put the connection out of
                // step.
                None => filtered
                    .declared(headers::declared_length(&parts.headers).filter(|_| has_body))
                    .boxed_unsync(),
                Some(declared) => {
                    let mut filtered = Box::pin(filtered);
                    let framing =
                        match Box::pin(prime_response(filtered.as_mut(), clock.as_deref(), &x))
                            .await
                        {
                            Ok(framing) => framing,
                            Err(e) => {
                                // The head is still ours: a filter's answer (or a
                                // buffer over its limit) replaces the upstream's.
                                // `serve` counts it if it is wasp's own.
                                return match chain.take_local() {
                                    Some(local) => Ok(error::boxed(local)),
                                    None => Err(e),
                                };
                            }
                        };
                    if let Some(n) = headers::reframe(&mut parts.headers, framing, declared) {
                        filtered.as_mut().declare(n);
                    }
                    filtered.boxed_unsync()
                }
            }
        }
        _ => body.map_err(Into::into).boxed_unsync(),
    };
    let body = match clock {
        Some(clock) if !switching => {
            Timed::new(body, clock, ctx.listener.stats.clone()).boxed_unsync()
        }
        _ => body,
    };
    Ok(Response::from_parts(parts, body))
}

/// Runs the response body through the filters until its first frame comes
/// out, under the stream's deadlines ([`within_deadlines`]): an upstream
/// that sends its head and stalls is answered 504 `upstream_timeout` when
/// `stream_idle_timeout` passes with nothing moving (the upstream's frames
/// touch the clock as they arrive, also while a filter buffers them).
async fn prime_response<B>(
    body: std::pin::Pin<&mut FilteredBody<B>>,
    clock: Option<&StreamClock>,
    x: &Exchange<'_>,
) -> Result<Framing, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let reset = |e: BoxError| ProxyError::UpstreamReset {
        cluster: x.cluster.to_string(),
        addr: x.endpoint,
        reason: format!("response body: {e}"),
    };
    let primed = std::pin::pin!(async { body.prime().await.map_err(reset) });
    let framing = within_deadlines(primed, clock, x.cluster, || x.endpoint).await?;
    if let Some(clock) = clock {
        clock.touch();
    }
    Ok(framing)
}

/// Rejects shapes of request that hyper lets through but a proxy must not
/// pass on, and bodies that declare a length over the limit.
pub(super) fn check_framing<B>(req: &Request<B>, max_body: u64) -> Result<(), ProxyError> {
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding are set".into(),
        ));
    }
    // RFC 9112 section 3.2: more than one Host, or an HTTP/1.1 request
    // without one, is a 400. Two Hosts would let the route see one name and
    // the upstream another.
    let mut hosts = h.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    if req.version() == Version::HTTP_11
        && req.uri().authority().is_none()
        && !h.contains_key(header::HOST)
    {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        ));
    }
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT tunnels are not supported".into(),
        ));
    }
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max_body {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
    }
    Ok(())
}

/// The authority the client addressed: from an absolute-form URI (forward
/// proxy use), else `:authority`, else `Host`.
fn authority(uri: &Uri, headers: &http::HeaderMap) -> Option<String> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str().to_string());
    }
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}
