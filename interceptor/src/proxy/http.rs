//! The HTTP side of a connection: hyper serves HTTP/1.1 or h2c, and each request is routed
//! (outbound: listener → virtual host → route → cluster; inbound: the original destination),
//! gets its headers (hop-by-hop removed, `x-request-id`, `x-forwarded-for` inbound,
//! `x-envoy-attempt-count`), and is sent upstream over a pooled keep-alive connection with the
//! route's timeout and retry policy. Every failure becomes a status code, never a panic:
//! 400/431 (hyper, malformed or oversized heads), 404 (no route), 413 (body limit), 503
//! (upstream down after retries), 504 (timeout).

use std::{
    borrow::Cow,
    convert::Infallible,
    error::Error as StdError,
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    task::Poll,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
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
    cluster::{Cluster, Endpoint, INBOUND_PASSTHROUGH, UpstreamBody},
    config::{Limits, Protocol as Declared, UpstreamProtocol},
    drain::Watch,
    h1::{Busy, DownstreamBody, TrackedBody},
    metrics::{self, ActiveGuard, Direction, ProxyMetrics},
    pool::{H2Settings, PooledBody, SendError},
    replay::Replay,
    retry::{Outcome, RetryPolicy},
    snapshot::{ConfigSource, Snapshot},
};

pub type ResponseBody = Either<PooledBody, Full<Bytes>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The caller's certificate as an mTLS proxy saw it. Nothing here terminates mTLS, so a
/// client-supplied one is a forgery: removed (Envoy's SANITIZE).
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Envoy's attempt header: 1 on the first try, 2 on the first retry…
pub const X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// What a request needs to know about its connection.
pub struct ConnCtx {
    pub direction: Direction,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub source: ConfigSource,
    pub metrics: ProxyMetrics,
    /// The protocol the config declares for this connection's port (`auto` if none).
    pub declared: Declared,
    /// This direction's in-flight gauge, looked up once per connection.
    pub active_requests: prometheus_client::metrics::gauge::Gauge,
    /// The last (cluster, code) series this connection recorded: a keep-alive connection
    /// mostly repeats it, and the handles skip two label-hash lookups per request.
    pub last_series: std::sync::Mutex<Option<Series>>,
    /// The same for gRPC statuses: calls on one connection mostly end alike.
    pub last_grpc: std::sync::Mutex<Option<GrpcSeries>>,
}

pub struct GrpcSeries {
    cluster: Arc<str>,
    status: Box<str>,
    counter: prometheus_client::metrics::counter::Counter,
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

    /// `cluster` as a response's trailers hook keeps it: the last call's copy when it repeats.
    fn grpc_cluster(&self, cluster: &str) -> Arc<str> {
        if let Ok(last) = self.last_grpc.lock()
            && let Some(s) = last.as_ref()
            && &*s.cluster == cluster
        {
            return s.cluster.clone();
        }
        Arc::from(cluster)
    }

    fn record_grpc(&self, cluster: &Arc<str>, status: &str) {
        let label = metrics::grpc_status_label(status);
        let Ok(mut last) = self.last_grpc.lock() else {
            self.metrics.grpc(self.direction, cluster, label);
            return;
        };
        let hit = last
            .as_ref()
            .is_some_and(|s| &*s.status == label && s.cluster == *cluster);
        if !hit {
            *last = Some(GrpcSeries {
                cluster: cluster.clone(),
                status: label.into(),
                counter: self.metrics.grpc_series(self.direction, cluster, label),
            });
        }
        if let Some(s) = last.as_ref() {
            s.counter.inc();
        }
    }
}

/// Serves h2c on a detected connection until the client closes it, the drain asks it to finish
/// (in-flight streams complete, then GOAWAY), or it has no open stream for too long: the header
/// read timeout before its first request (a client that sends the preface and then nothing),
/// `idle_timeout` after. The HTTP/2 limits (streams, resets, keep-alive pings) come from the
/// config.
pub async fn serve_h2<S>(io: S, ctx: Arc<ConnCtx>, limits: &Limits, mut drain: Watch)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy = Busy::default();
    let tokens = busy.weak();
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let starts = started.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (request_busy, response_busy) = (tokens.token(), tokens.token());
        // Boxed: hyper moves a stream's future several times before it first runs (into its
        // task among others), and a pointer moves cheaper than a request's whole state.
        Box::pin(async move {
            let req = req.map(|body| DownstreamBody::new(body, request_busy));
            let resp = handle(req, &ctx).await;
            Ok::<_, Infallible>(resp.map(|body| TrackedBody::new(body, response_busy)))
        })
    });
    let head_bytes = (limits.max_request_headers_kb as usize).saturating_mul(1024);
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.h2_max_concurrent_streams.max(1))
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams as usize)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams as usize)
        .keep_alive_interval(limits.h2_keepalive_interval.nonzero())
        .keep_alive_timeout(limits.h2_keepalive_timeout.0);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let first_wait = limits.header_read_timeout.nonzero();
    let idle_wait = limits.idle_timeout.nonzero();
    let period = match (first_wait, idle_wait) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(Duration::from_secs(3600)),
    };
    let mut served = false;
    let mut seen = 0;
    let mut idle_since = Instant::now();
    let timer = tokio::time::sleep(period);
    tokio::pin!(timer);
    let mut closing = false;
    // After an idle GOAWAY, how long the client gets to finish the close (answer the PING
    // that confirms it) before the socket is simply closed: a silent client never answers.
    let mut hard_close: Option<Instant> = None;
    let result = std::future::poll_fn(|cx| {
        if !closing && drain.poll_drain(cx).is_ready() {
            closing = true;
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
            return Poll::Ready(res);
        }
        if let Some(at) = hard_close {
            if Instant::now() >= at {
                debug!("client did not finish the close; dropping the connection");
                return Poll::Ready(Ok(()));
            }
            if timer.as_mut().poll(cx).is_ready() {
                timer.as_mut().reset(at);
                let _ = timer.as_mut().poll(cx);
            }
            return Poll::Pending;
        }
        // Streams start and end on their own tasks, without waking this one: the timer looks
        // every `period`, so a connection closes between one and two timeouts after its last
        // stream.
        while !closing && timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let started_now = started.load(std::sync::atomic::Ordering::Relaxed);
            if started_now != seen || busy.open() > 0 {
                seen = started_now;
                served |= started_now > 0;
                idle_since = now;
            }
            let wait = if served { idle_wait } else { first_wait };
            if let Some(wait) = wait
                && now.duration_since(idle_since) >= wait
            {
                debug!(?wait, served, "http/2 connection idle; closing");
                closing = true;
                conn.as_mut().graceful_shutdown();
                if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                    return Poll::Ready(res);
                }
                let at = now + wait.min(Duration::from_secs(10));
                hard_close = Some(at);
                timer.as_mut().reset(at);
                let _ = timer.as_mut().poll(cx);
                break;
            }
            timer.as_mut().reset(now + period);
        }
        Poll::Pending
    })
    .await;
    if let Err(err) = result {
        debug!(%err, "http connection ended with an error");
    }
}

/// One request, start to finish, with its metrics.
pub async fn handle(req: Request<DownstreamBody>, ctx: &Arc<ConnCtx>) -> Response<ResponseBody> {
    let start = Instant::now();
    ctx.active_requests.inc();
    let _active = ActiveGuard(ctx.active_requests.clone());
    let snapshot = ctx.source.local_snapshot();
    let grpc = is_grpc(req.headers());
    let (mut response, cluster) = route_and_forward(req, ctx, &snapshot).await;
    if grpc {
        if let Some(LocalReply(message)) = response.extensions().get::<LocalReply>() {
            response = grpc_reply(response.status(), message);
        }
        observe_grpc_status(&mut response, ctx, &cluster);
    }
    ctx.record(&cluster, response.status().as_u16(), start.elapsed());
    response
}

/// A gRPC request (`application/grpc`, `application/grpc+proto`, `application/grpc-web…`).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Counts the gRPC status of a response: from its head (trailers-only answers, the proxy's
/// own) or, when it streams, from its trailers.
fn observe_grpc_status(response: &mut Response<ResponseBody>, ctx: &Arc<ConnCtx>, cluster: &str) {
    let cluster = ctx.grpc_cluster(cluster);
    if let Some(code) = response.headers().get(&GRPC_STATUS) {
        ctx.record_grpc(&cluster, code.to_str().unwrap_or("invalid"));
        return;
    }
    if let Either::Left(body) = response.body_mut() {
        body.on_trailers(GrpcStatusHook {
            ctx: ctx.clone(),
            cluster,
        });
    }
}

/// Counts a streamed gRPC response's status from its trailers once its body ends.
pub struct GrpcStatusHook {
    ctx: Arc<ConnCtx>,
    cluster: Arc<str>,
}

impl GrpcStatusHook {
    /// The body ended, with these trailers (`None`: without).
    pub fn ended(self, trailers: Option<&HeaderMap>) {
        let code = trailers
            .and_then(|t| t.get(&GRPC_STATUS))
            .map_or("none", |v| v.to_str().unwrap_or("invalid"));
        self.ctx.record_grpc(&self.cluster, code);
    }
}

/// The `Host` a request is for: the header, or the authority of an absolute / h2 URI.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// A request whose host is ambiguous is refused (400) rather than routed by one reading and
/// served by another: two `Host` headers, or an h2 `Host` that disagrees with `:authority`.
fn ambiguous_host<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some("duplicate Host header\n");
    }
    if req.version() == Version::HTTP_2
        && let (Some(host), Some(authority)) = (first, req.uri().authority())
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Some("Host header disagrees with :authority\n");
    }
    None
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`),
/// lower case.
fn upgrade_of<B>(req: &Request<B>) -> Option<String> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let value = req.headers().get(header::UPGRADE)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    // `websocket`…: the protocol name without its version.
    let name = first
        .split('/')
        .next()
        .unwrap_or(first)
        .to_ascii_lowercase();
    // An h2c upgrade is only an offer: dropped, the request goes on as HTTP/1.1 (as Envoy).
    (!name.is_empty() && name != "h2c").then_some(name)
}

/// What `forward` needs to know besides the request.
struct Call<'a> {
    cluster: &'a Arc<Cluster>,
    timeout: Option<Duration>,
    retry: &'a RetryPolicy,
    /// The port's declared upstream protocol (`auto` = the downstream's).
    declared: UpstreamProtocol,
    upgrade: Option<String>,
}

/// The request's answer and the cluster label it counts under (borrowed from the snapshot
/// when it names a cluster: no copy per request).
async fn route_and_forward<'s>(
    req: Request<DownstreamBody>,
    ctx: &ConnCtx,
    snapshot: &'s Snapshot,
) -> (Response<ResponseBody>, Cow<'s, str>) {
    let limits = &snapshot.config.limits;
    if let Some(why) = ambiguous_host(&req) {
        return (local_reply(StatusCode::BAD_REQUEST, why), "none".into());
    }
    let upgrade = upgrade_of(&req);
    if ctx.direction == Direction::Inbound {
        let cluster = &snapshot.clusters.inbound_passthrough;
        let port = ctx.orig_dst.port();
        let declared_port = snapshot.config.inbound.ports.iter().any(|p| p.port == port);
        let call = Call {
            cluster,
            timeout: snapshot.inbound_timeout,
            retry: &RetryPolicy::none(),
            declared: ctx.declared.upstream(),
            upgrade,
        };
        let resp = forward(req, &call, ctx, limits).await;
        // A series per port the app serves (or the config declares); a port scan's refused
        // connections all count under the passthrough cluster.
        let name = if declared_port || resp.extensions().get::<LocalReply>().is_none() {
            format!("inbound|{port}||").into()
        } else {
            INBOUND_PASSTHROUGH.into()
        };
        return (resp, name);
    }
    // The host and path are borrowed only while routing picks; what it picks lives in the
    // snapshot.
    let action = {
        let host = request_host(&req).unwrap_or_default();
        let vhost = snapshot
            .listeners
            .get(&ctx.orig_dst.port())
            .and_then(|l| l.virtual_host(host));
        match vhost {
            // No virtual host claims this Host: the original destination (Istio's ALLOW_ANY).
            None => None,
            Some(vhost) => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let Some(route) = vhost.route(path, req.headers()) else {
                    debug!(host, path, vhost = %vhost.name, "no route matches");
                    return (
                        local_reply(StatusCode::NOT_FOUND, "route not found\n"),
                        "none".into(),
                    );
                };
                // Borrowed from the snapshot this request holds: no shared reference counts
                // touched.
                let action = &route.action;
                if let Some(proto) = &upgrade
                    && !action.upgrades.iter().any(|u| u == proto)
                {
                    debug!(host, path, upgrade = %proto, "upgrade not allowed on this route");
                    return (
                        local_reply(StatusCode::FORBIDDEN, "upgrade not allowed on this route\n"),
                        "none".into(),
                    );
                }
                Some(action)
            }
        }
    };
    let Some(action) = action else {
        let cluster = &snapshot.clusters.outbound_passthrough;
        let call = Call {
            cluster,
            timeout: snapshot.outbound_passthrough_timeout,
            retry: &RetryPolicy::none(),
            declared: ctx.declared.upstream(),
            upgrade,
        };
        let resp = forward(req, &call, ctx, limits).await;
        return (resp, Cow::Borrowed(cluster.name.as_str()));
    };
    let cluster = action.target.pick(balancer::random_f64());
    let call = Call {
        cluster,
        timeout: action.timeout,
        retry: &action.retry,
        declared: ctx.declared.upstream(),
        upgrade,
    };
    let resp = forward(req, &call, ctx, limits).await;
    (resp, Cow::Borrowed(cluster.name.as_str()))
}

/// A request body ready for attempts: replayable bytes, a stream that can go once, or a
/// stream kept while it goes, up to the retry buffer.
enum RequestBody {
    Replay(Bytes),
    Stream(Option<Limited<DownstreamBody>>),
    Kept(Replay),
}

impl RequestBody {
    fn for_attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Replay(b) => Some(Either::Left(Full::new(b.clone()))),
            RequestBody::Stream(s) => s.take().map(|s| Either::Right(Either::Left(s))),
            RequestBody::Kept(r) => Some(Either::Right(Either::Right(r.attempt()))),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            RequestBody::Replay(_) => true,
            RequestBody::Stream(_) => false,
            RequestBody::Kept(r) => r.replayable(),
        }
    }
}

/// A body read to its end, its data as one buffer (trailers dropped), as `collect` and
/// `to_bytes` would, without their list of chunks: a body that comes in one piece (a unary
/// call's message, with its END_STREAM) is kept as it came, with no allocation.
async fn read_whole(mut body: DownstreamBody) -> Result<Bytes, hyper::Error> {
    let mut whole = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        // An empty DATA frame carrying END_STREAM after the message (a common client
        // pattern) would otherwise copy the whole body to append nothing.
        if data.is_empty() {
            continue;
        }
        if let Some(buf) = joined.as_mut() {
            buf.extend_from_slice(&data);
        } else if whole.is_empty() {
            whole = data;
        } else {
            let mut buf = BytesMut::with_capacity(whole.len() + data.len());
            buf.extend_from_slice(&whole);
            buf.extend_from_slice(&data);
            joined = Some(buf);
        }
    }
    Ok(joined.map_or(whole, BytesMut::freeze))
}

/// `grpc-timeout` (RFC: up to 8 digits and a unit, H M S m u n) as a duration.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if !(2..=9).contains(&v.len()) || !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The protocol of the upstream request: the cluster's, else the port's declared one, else
/// the downstream's (an upgrade is always HTTP/1.1).
fn upstream_version(call: &Call<'_>, downstream: Version) -> Version {
    if call.upgrade.is_some() {
        return Version::HTTP_11;
    }
    let chosen = match call.cluster.protocol {
        UpstreamProtocol::Auto => call.declared,
        p => p,
    };
    match chosen {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
        UpstreamProtocol::Auto if downstream == Version::HTTP_2 => Version::HTTP_2,
        UpstreamProtocol::Auto => Version::HTTP_11,
    }
}

async fn forward(
    req: Request<DownstreamBody>,
    call: &Call<'_>,
    ctx: &ConnCtx,
    limits: &Limits,
) -> Response<ResponseBody> {
    let cluster = call.cluster;
    let version = upstream_version(call, req.version());
    let (mut parts, body) = req.into_parts();
    let upgrade = call
        .upgrade
        .as_ref()
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    prepare_request_headers(&mut parts.headers, &parts.uri, version, ctx);
    if let Some(value) = upgrade {
        // The hop-by-hop pair the upstream needs to see to upgrade.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
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
    let retry = call.retry;
    let body = if body.is_end_stream() {
        RequestBody::Replay(Bytes::new())
    } else if retry.num_retries > 0 && declared.is_some_and(|n| n <= limits.retry_buffer_bytes) {
        // Small enough to keep: the request can be retried.
        match read_whole(body).await {
            // hyper ends an h2 body cleanly when the client resets its stream with NO_ERROR:
            // a body shorter than its content-length is cut short, never forwarded (the
            // upstream would be handed the declared length and fewer bytes, on every retry).
            Ok(whole) if declared.is_some_and(|n| whole.len() as u64 != n) => {
                debug!(
                    got = whole.len(),
                    declared = declared.unwrap_or(0),
                    "client body shorter than its content-length"
                );
                return local_reply(StatusCode::BAD_REQUEST, "incomplete request body\n");
            }
            Ok(whole) => RequestBody::Replay(whole),
            Err(err) => {
                debug!(%err, "client body ended early");
                return local_reply(StatusCode::BAD_REQUEST, "incomplete request body\n");
            }
        }
    } else if retry.num_retries > 0 && declared.is_none() && call.upgrade.is_none() {
        // No length to judge by (gRPC never sends one): kept while forwarded, up to the
        // retry buffer; past it the request simply is not retried.
        let limit = usize::try_from(limits.retry_buffer_bytes).unwrap_or(usize::MAX);
        RequestBody::Kept(Replay::new(Limited::new(body, stream_limit), limit))
    } else {
        RequestBody::Stream(Some(Limited::new(body, stream_limit)))
    };
    // A gRPC deadline caps the route's timeout (past it the client has given up anyway).
    let timeout = match (call.timeout, grpc_timeout(&parts.headers)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let h2 = H2Settings {
        max_requests_per_connection: limits.h2_max_requests_per_connection as usize,
        keepalive_interval: limits.h2_upstream_keepalive_interval.nonzero(),
        tcp_keepalive: limits.h2_keepalive_interval.nonzero(),
        keepalive_timeout: limits.h2_keepalive_timeout.0,
        max_header_list_size: limits.max_request_headers_kb.saturating_mul(1024),
    };
    let how = Attempts {
        version,
        upgrade: call.upgrade.is_some(),
        h2: &h2,
        h2_fallback: call.cluster.protocol == UpstreamProtocol::Auto
            && call.declared == UpstreamProtocol::Auto,
    };
    let attempts = attempts(&mut parts, body, cluster, retry, ctx, &how);
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

/// How each attempt is sent.
struct Attempts<'a> {
    version: Version,
    upgrade: bool,
    h2: &'a H2Settings,
    /// HTTP/2 was chosen only because the client spoke it (`auto`): an endpoint that does not
    /// speak h2c gets HTTP/1.1 instead.
    h2_fallback: bool,
}

async fn attempts(
    parts: &mut http::request::Parts,
    mut body: RequestBody,
    cluster: &Arc<Cluster>,
    retry: &RetryPolicy,
    ctx: &ConnCtx,
    how: &Attempts<'_>,
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
        let Some(attempt_body) = body.for_attempt() else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream reset\n");
        };
        // The last possible attempt takes the headers instead of copying them.
        let last = !body.replayable() || attempt > retry.num_retries || how.upgrade;
        let request =
            match upstream_request(parts, &endpoint, attempt, attempt_body, last, how.version) {
                Ok(r) => r,
                Err(err) => {
                    debug!(%err, "cannot build the upstream request");
                    return local_reply(StatusCode::BAD_REQUEST, "bad request\n");
                }
            };
        cluster.stats.rq_total.fetch_add(1, Ordering::Relaxed);
        let in_flight = endpoint.start();
        let sent = async {
            if how.upgrade {
                Box::pin(pool.send_upgrade(endpoint.addr, request)).await
            } else if how.version == Version::HTTP_2 {
                pool.send_h2(endpoint.addr, request, how.h2, how.h2_fallback)
                    .await
            } else {
                pool.send(endpoint.addr, request).await
            }
        };
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
                    .get(&GRPC_STATUS)
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
        // A client's broken or oversized body says nothing about the endpoint.
        if outcome != Outcome::ClientBody {
            cluster.record(&endpoint, !outcome.is_endpoint_failure());
        }
        if body.replayable() && !how.upgrade && retry.should_retry(attempt, outcome) {
            debug!(cluster = %cluster.name, endpoint = %endpoint.addr, attempt, ?outcome, "retrying");
            // Only a retry needs the endpoints tried so far: no allocation for the usual
            // single attempt.
            tried.push(endpoint.addr);
            cluster.stats.rq_retry.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.retry(ctx.direction, &cluster.name);
            tokio::time::sleep(retry.backoff(attempt, balancer::random_f64())).await;
            attempt += 1;
            continue;
        }
        return match result {
            Ok(resp) => {
                let (mut head, incoming) = resp.into_parts();
                if how.upgrade && head.status == StatusCode::SWITCHING_PROTOCOLS {
                    // The client needs `Connection: upgrade` and `Upgrade` to switch too.
                    strip_hop_by_hop_except_upgrade(&mut head.headers);
                } else {
                    strip_hop_by_hop(&mut head.headers);
                }
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
    version: Version,
) -> Result<Request<UpstreamBody>, http::Error> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut headers = if take_headers {
        std::mem::take(&mut parts.headers)
    } else {
        parts.headers.clone()
    };
    let uri = if version == Version::HTTP_2 {
        // h2: the host travels as `:authority` (and `:scheme` must be there).
        match headers.remove(HOST) {
            // An h2 client's request as it came (no Host): its URI already says all that.
            None if parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
                && parts.uri.authority().is_some() =>
            {
                parts.uri.clone()
            }
            host => {
                let authority = host
                    .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                    .or_else(|| parts.uri.authority().cloned())
                    .unwrap_or_else(|| endpoint.authority.clone());
                Uri::builder()
                    .scheme(http::uri::Scheme::HTTP)
                    .authority(authority)
                    .path_and_query(path)
                    .build()?
            }
        }
    } else {
        // HTTP/1.1 upstream: origin-form target, the client's Host kept.
        if !headers.contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str())
        {
            headers.insert(HOST, v);
        }
        Uri::from(path)
    };
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(version)
        .body(body)?;
    *req.headers_mut() = headers;
    req.headers_mut()
        .insert(X_ATTEMPT_COUNT, attempt_count(attempt));
    Ok(req)
}

/// `x-envoy-attempt-count`'s value: static text for the usual few attempts
/// (`HeaderValue::from(u32)` formats into a fresh buffer every time).
fn attempt_count(attempt: u32) -> HeaderValue {
    const FEW: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match attempt.checked_sub(1).and_then(|i| FEW.get(i as usize)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(attempt),
    }
}

fn classify_error(err: &SendError) -> Outcome {
    match err {
        SendError::Connect { .. } | SendError::NotHttp2 { .. } => return Outcome::ConnectFailure,
        SendError::Body { .. } => return Outcome::ClientBody,
        // hyper's HTTP/1.1 client: a user error caused by the request body's own error.
        SendError::Request { source, .. } if source.is_user() && source.source().is_some() => {
            return Outcome::ClientBody;
        }
        _ => {}
    }
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && refused(h2)
        {
            return Outcome::RefusedStream;
        }
        source = e.source();
    }
    Outcome::Reset
}

/// Whether the upstream never processed the stream: REFUSED_STREAM, or a GOAWAY whose last
/// stream id is below it. h2 fails a stream with the peer's GOAWAY only in that case (a stream
/// the peer took and then lost to the connection closing fails with an I/O error instead), so
/// like REFUSED_STREAM it is safe to retry and no fault of the endpoint's.
///
/// In the vendored h2 (`third_party/h2/src/proto`): `streams/streams.rs` `recv_go_away` fails
/// only the streams above the frame's last stream id with the remote GOAWAY, whatever its error
/// code, and a stream opened after it gets the same error from `send_request`
/// (`ensure_no_conn_error`). A stream at or below the last id stays open; when the connection
/// then ends it gets an I/O error (`streams/state.rs` `recv_eof`: BrokenPipe; or the read's own
/// error through `connection.rs` `handle_poll2_result`), classified a reset: retried only under
/// `retry_on: reset` (or 5xx, gateway-error). h2's own GOAWAY (a protocol error it detected) is
/// `Initiator::Library`, not remote. Pinned by the `streams_a_*` tests in
/// `tests/upstream_h2_stalls.rs`.
fn refused(err: &h2::Error) -> bool {
    err.reason() == Some(h2::Reason::REFUSED_STREAM) || (err.is_go_away() && err.is_remote())
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
    if outcome == Outcome::ClientBody {
        debug!(%endpoint, err = %err, source = ?err.source(), "client body ended early");
        return local_reply(StatusCode::BAD_REQUEST, "incomplete request body\n");
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

/// Marks a response the proxy made itself (with its message), so a gRPC request gets it in
/// gRPC's shape and metrics can tell it from the app's.
#[derive(Clone, Debug)]
pub struct LocalReply(pub Bytes);

pub fn local_reply(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let body = body.into();
    let mut resp = Response::new(Either::Right(Full::new(body.clone())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.extensions_mut().insert(LocalReply(body));
    resp
}

/// The gRPC status for a reply the proxy makes (as Envoy maps them): no upstream → 14
/// UNAVAILABLE, timeout → 4 DEADLINE_EXCEEDED, a limit → 8 RESOURCE_EXHAUSTED.
fn grpc_code(status: StatusCode) -> u32 {
    match status.as_u16() {
        504 => 4,
        413 | 429 | 431 => 8,
        404 => 12,
        403 => 7,
        401 => 16,
        400 => 13,
        _ => 14,
    }
}

/// A gRPC "trailers-only" answer: HTTP 200, `application/grpc`, the status in the head.
fn grpc_reply(status: StatusCode, message: &[u8]) -> Response<ResponseBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(grpc_code(status)));
    // grpc-message is percent-encoded (gRPC's HTTP/2 spec).
    let mut encoded = String::new();
    for b in message.trim_ascii() {
        if (0x20..0x7f).contains(b) && *b != b'%' {
            encoded.push(char::from(*b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert(GRPC_MESSAGE, v);
    }
    resp.extensions_mut()
        .insert(LocalReply(Bytes::copy_from_slice(message)));
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

/// Like `strip_hop_by_hop`, keeping the `Connection: upgrade` + `Upgrade` pair of a 101.
fn strip_hop_by_hop_except_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.remove(header::UPGRADE);
    strip_hop_by_hop(headers);
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
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

fn prepare_request_headers(headers: &mut HeaderMap, uri: &Uri, version: Version, ctx: &ConnCtx) {
    // `TE: trailers` is end to end in effect (gRPC servers require it over h2): kept.
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(X_FORWARDED_CLIENT_CERT);
    // h2 requests carry the host in :authority; HTTP/1.1 upstream needs a Host header (an h2
    // upstream takes :authority from the URI).
    if version != Version::HTTP_2
        && !headers.contains_key(HOST)
        && let Some(authority) = uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, v);
    }
    if !headers.contains_key(&X_REQUEST_ID)
        && let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from_owner(request_id_bytes()))
    {
        // One allocation that clones share (a retry's copy of the headers): a value made
        // from a slice is copied into a `Vec`, and its first clone allocates once more.
        headers.insert(X_REQUEST_ID, v);
    }
    // Unique per request: HPACK gains nothing from indexing it, and every indexed id would
    // evict a header that repeats (and lengthen the encoder's search for the next one). Sent
    // "never indexed".
    if let Some(id) = headers.get_mut(&X_REQUEST_ID) {
        id.set_sensitive(true);
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
    fn a_client_body_error_is_not_blamed_on_the_endpoint_nor_retried() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let err = SendError::Body {
            addr,
            source: "the client's body was cut short".into(),
        };
        let outcome = classify_error(&err);
        assert_eq!(outcome, Outcome::ClientBody);
        assert!(!outcome.is_endpoint_failure());
        let mut every = RetryPolicy::none();
        every.num_retries = 3;
        every.on = super::super::retry::RetryOn::parse("5xx,reset,connect-failure,refused-stream")
            .expect("valid");
        assert!(!every.should_retry(1, outcome));
        let reply = failure_reply(&err, outcome, addr);
        assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    }

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
