//! The HTTP side of a connection: hyper serves HTTP/1.1 or h2c, and each request is routed
//! (outbound: listener → virtual host → route → cluster; inbound: the original destination),
//! gets its headers (hop-by-hop removed, `x-request-id`, `x-forwarded-for` inbound,
//! `x-envoy-attempt-count`), and is sent upstream over a pooled keep-alive connection with the
//! route's timeout and retry policy. Every failure becomes a status code, never a panic:
//! 400/431 (hyper, malformed or oversized heads), 404 (no route), 413 (body limit), 503
//! (upstream down after retries), 504 (timeout).

use std::{
    convert::Infallible,
    error::Error as StdError,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, CONTENT_LENGTH, HOST},
};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::{
    body::{Body, Incoming},
    server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tracing::debug;

use super::{
    balancer,
    cluster::{Cluster, Endpoint, UpstreamBody},
    config::Limits,
    drain::Watch,
    h1::DownstreamBody,
    metrics::{ActiveGuard, Direction, ProxyMetrics},
    pool::{PooledBody, SendError},
    retry::{Outcome, RetryPolicy},
    snapshot::{ConfigSource, Snapshot},
};

pub type ResponseBody = Either<PooledBody, Full<Bytes>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Envoy's attempt header: 1 on the first try, 2 on the first retry…
pub const X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// What a request needs to know about its connection.
pub struct ConnCtx {
    pub direction: Direction,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub source: ConfigSource,
    pub metrics: ProxyMetrics,
    /// This direction's in-flight gauge, looked up once per connection.
    pub active_requests: prometheus_client::metrics::gauge::Gauge,
    /// The last (cluster, code) series this connection recorded: a keep-alive connection
    /// mostly repeats it, and the handles skip two label-hash lookups per request.
    pub last_series: std::sync::Mutex<Option<Series>>,
}

pub struct Series {
    cluster: String,
    code: u16,
    requests: prometheus_client::metrics::counter::Counter,
    duration: prometheus_client::metrics::histogram::Histogram,
}

impl ConnCtx {
    fn record(&self, cluster: &str, code: u16, elapsed: Duration) {
        let Ok(mut last) = self.last_series.lock() else {
            self.metrics.request(self.direction, cluster, code, elapsed);
            return;
        };
        let hit = last
            .as_ref()
            .is_some_and(|s| s.code == code && s.cluster == cluster);
        if !hit {
            let (requests, duration) = self.metrics.series(self.direction, cluster, code);
            *last = Some(Series {
                cluster: cluster.to_owned(),
                code,
                requests,
                duration,
            });
        }
        if let Some(s) = last.as_ref() {
            s.requests.inc();
            s.duration.observe(elapsed.as_secs_f64());
        }
    }
}

/// Serves h2c on a detected connection until the client closes it or the drain asks it to
/// finish (in-flight streams complete, then GOAWAY).
pub async fn serve_h2<S>(io: S, ctx: Arc<ConnCtx>, limits: &Limits, drain: Watch)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move {
            let req = req.map(|body| DownstreamBody::new(body, None));
            Ok::<_, Infallible>(handle(req, &ctx).await)
        }
    });
    let head_bytes = (limits.max_request_headers_kb as usize).saturating_mul(1024);
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        _ = drain => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        debug!(%err, "http connection ended with an error");
    }
}

/// One request, start to finish, with its metrics.
pub async fn handle(req: Request<DownstreamBody>, ctx: &ConnCtx) -> Response<ResponseBody> {
    let start = Instant::now();
    ctx.active_requests.inc();
    let _active = ActiveGuard(ctx.active_requests.clone());
    let snapshot = ctx.source.local_snapshot();
    let (response, cluster) = route_and_forward(req, ctx, &snapshot).await;
    ctx.record(&cluster, response.status().as_u16(), start.elapsed());
    response
}

/// The `Host` a request is for: the header, or the authority of an absolute / h2 URI.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

async fn route_and_forward(
    req: Request<DownstreamBody>,
    ctx: &ConnCtx,
    snapshot: &Snapshot,
) -> (Response<ResponseBody>, String) {
    let limits = &snapshot.config.limits;
    if ctx.direction == Direction::Inbound {
        let cluster = &snapshot.clusters.inbound_passthrough;
        let name = format!("inbound|{}||", ctx.orig_dst.port());
        let resp = forward(
            req,
            cluster,
            snapshot.inbound_timeout,
            &RetryPolicy::none(),
            ctx,
            limits,
        )
        .await;
        return (resp, name);
    }
    let host = request_host(&req).unwrap_or_default().to_owned();
    let vhost = snapshot
        .listeners
        .get(&ctx.orig_dst.port())
        .and_then(|l| l.virtual_host(&host));
    let Some(vhost) = vhost else {
        // No virtual host claims this Host: the original destination (Istio's ALLOW_ANY).
        let cluster = &snapshot.clusters.outbound_passthrough;
        let resp = forward(
            req,
            cluster,
            snapshot.outbound_passthrough_timeout,
            &RetryPolicy::none(),
            ctx,
            limits,
        )
        .await;
        return (resp, cluster.name.clone());
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Some(route) = vhost.route(&path, req.headers()) else {
        debug!(host, path, vhost = %vhost.name, "no route matches");
        return (
            local_reply(StatusCode::NOT_FOUND, "route not found\n"),
            "none".into(),
        );
    };
    // Borrowed from the snapshot this request holds: no shared reference counts touched.
    let action = &route.action;
    let cluster = action.target.pick(balancer::random_f64());
    let resp = forward(req, cluster, action.timeout, &action.retry, ctx, limits).await;
    (resp, cluster.name.clone())
}

/// A request body ready for attempts: replayable bytes, or a stream that can go once.
enum RequestBody {
    Replay(Bytes),
    Stream(Option<Limited<DownstreamBody>>),
}

impl RequestBody {
    fn for_attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Replay(b) => Some(Either::Left(Full::new(b.clone()))),
            RequestBody::Stream(s) => s.take().map(Either::Right),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replay(_))
    }
}

async fn forward(
    req: Request<DownstreamBody>,
    cluster: &Arc<Cluster>,
    timeout: Option<Duration>,
    retry: &RetryPolicy,
    ctx: &ConnCtx,
    limits: &Limits,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts.headers, &parts.uri, ctx);
    let declared = content_length(&parts.headers);
    let max_body = limits.max_request_body_bytes;
    if max_body > 0 && declared.is_some_and(|n| n > max_body) {
        return local_reply(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n");
    }
    let stream_limit = if max_body > 0 {
        usize::try_from(max_body).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    let body = if body.is_end_stream() {
        RequestBody::Replay(Bytes::new())
    } else if retry.num_retries > 0 && declared.is_some_and(|n| n <= limits.retry_buffer_bytes) {
        // Small enough to keep: the request can be retried.
        match body.collect().await {
            Ok(collected) => RequestBody::Replay(collected.to_bytes()),
            Err(err) => {
                debug!(%err, "client body ended early");
                return local_reply(StatusCode::BAD_REQUEST, "incomplete request body\n");
            }
        }
    } else {
        RequestBody::Stream(Some(Limited::new(body, stream_limit)))
    };
    let attempts = attempts(&mut parts, body, cluster, retry, ctx);
    match timeout {
        None => attempts.await,
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(resp) => resp,
            Err(_) => {
                cluster.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
                local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
            }
        },
    }
}

async fn attempts(
    parts: &mut http::request::Parts,
    mut body: RequestBody,
    cluster: &Arc<Cluster>,
    retry: &RetryPolicy,
    ctx: &ConnCtx,
) -> Response<ResponseBody> {
    let Some(pool) = cluster.pool() else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt: u32 = 1;
    loop {
        let avoid: &[SocketAddr] = if retry.previous_hosts { &tried } else { &[] };
        let Some(endpoint) = cluster.pick(ctx.orig_dst, avoid) else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        };
        tried.push(endpoint.addr);
        let Some(attempt_body) = body.for_attempt() else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream reset\n");
        };
        // The last possible attempt takes the headers instead of copying them.
        let last = !body.replayable() || attempt > retry.num_retries;
        let request = match upstream_request(parts, &endpoint, attempt, attempt_body, last) {
            Ok(r) => r,
            Err(err) => {
                debug!(%err, "cannot build the upstream request");
                return local_reply(StatusCode::BAD_REQUEST, "bad request\n");
            }
        };
        cluster.stats.rq_total.fetch_add(1, Ordering::Relaxed);
        let in_flight = endpoint.start();
        let sent = pool.send(endpoint.addr, request);
        let result = match retry.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r.map_err(Some),
                Err(_) => Err(None),
            },
            None => sent.await.map_err(Some),
        };
        drop(in_flight);
        let outcome = match &result {
            Ok(resp) => Outcome::Response {
                status: resp.status().as_u16(),
                grpc: resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            },
            Err(None) => Outcome::PerTryTimeout,
            Err(Some(err)) => classify_error(err),
        };
        if outcome == Outcome::ConnectFailure {
            cluster
                .stats
                .cx_connect_fail
                .fetch_add(1, Ordering::Relaxed);
        }
        cluster.record(&endpoint, !outcome.is_endpoint_failure());
        if body.replayable() && retry.should_retry(attempt, outcome) {
            debug!(cluster = %cluster.name, endpoint = %endpoint.addr, attempt, ?outcome, "retrying");
            cluster.stats.rq_retry.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.retry(ctx.direction, &cluster.name);
            tokio::time::sleep(retry.backoff(attempt, balancer::random_f64())).await;
            attempt += 1;
            continue;
        }
        return match result {
            Ok(resp) => {
                let (mut head, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                Response::from_parts(head, Either::Left(incoming))
            }
            Err(None) => local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
            Err(Some(err)) => failure_reply(&err, outcome, endpoint.addr),
        };
    }
}

fn upstream_request(
    parts: &mut http::request::Parts,
    endpoint: &Endpoint,
    attempt: u32,
    body: UpstreamBody,
    take_headers: bool,
) -> Result<Request<UpstreamBody>, http::Error> {
    // HTTP/1.1 upstream: origin-form target, the client's Host kept.
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(Uri::from(path))
        .version(Version::HTTP_11)
        .body(body)?;
    *req.headers_mut() = if take_headers {
        std::mem::take(&mut parts.headers)
    } else {
        parts.headers.clone()
    };
    if !req.headers().contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    req.headers_mut()
        .insert(X_ATTEMPT_COUNT, HeaderValue::from(attempt));
    Ok(req)
}

fn classify_error(err: &SendError) -> Outcome {
    if matches!(err, SendError::Connect { .. }) {
        return Outcome::ConnectFailure;
    }
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return Outcome::RefusedStream;
        }
        source = e.source();
    }
    Outcome::Reset
}

fn caused_by_body_limit(err: &SendError) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if e.is::<LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn failure_reply(
    err: &SendError,
    outcome: Outcome,
    endpoint: SocketAddr,
) -> Response<ResponseBody> {
    if caused_by_body_limit(err) {
        return local_reply(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n");
    }
    debug!(%endpoint, ?outcome, err = %err, source = ?err.source(), "upstream failed");
    // Envoy's wording, which tools and people grep for.
    let reason = match outcome {
        Outcome::ConnectFailure => "connection failure",
        Outcome::RefusedStream => "remote refused stream reset",
        _ => "connection termination",
    };
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "upstream connect error or disconnect/reset before headers. reset reason: {reason}\n"
        ),
    )
}

pub fn local_reply(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(Either::Right(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Headers a proxy must not forward (RFC 9110 §7.6.1), plus those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names instead of seven lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn prepare_request_headers(headers: &mut HeaderMap, uri: &Uri, ctx: &ConnCtx) {
    strip_hop_by_hop(headers);
    // h2 requests carry the host in :authority; HTTP/1.1 upstream needs a Host header.
    if !headers.contains_key(HOST)
        && let Some(authority) = uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, v);
    }
    if !headers.contains_key(&X_REQUEST_ID)
        && let Ok(v) = HeaderValue::from_bytes(&request_id_bytes())
    {
        headers.insert(X_REQUEST_ID, v);
    }
    if ctx.direction == Direction::Inbound {
        // Append the client, as Envoy's inbound listener does (use_remote_address).
        let peer = crate::socket::canonical(ctx.peer).ip().to_string();
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.is_empty() => format!("{prev}, {peer}"),
            _ => peer,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
    }
}

/// A random UUID v4 in text form, like Envoy's generated request ids.
pub fn request_id() -> String {
    String::from_utf8_lossy(&request_id_bytes()).into_owned()
}

/// The same, without going through `fmt` (it runs for every request).
fn request_id_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = balancer::random_u64();
    let lo = balancer::random_u64();
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x4000; // version 4
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000; // RFC 4122 variant
    let mut out = [b'-'; 36];
    let mut nibbles = (0..16)
        .rev()
        .map(|i| (hi >> (i * 4)) & 0xf)
        .chain((0..16).rev().map(|i| (lo >> (i * 4)) & 0xf));
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        if let Some(n) = nibbles.next() {
            *slot = HEX[n as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4_and_differ() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert!(
            a.chars()
                .enumerate()
                .all(|(i, c)| if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }),
            "{a}"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
