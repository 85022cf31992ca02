//! HTTP/1 downstream connections that cost almost nothing while idle. hyper keeps an 8 KiB read
//! buffer, an 8 KiB write buffer, a cached header map and room for a request future per
//! connection for as long as the connection lives; a sidecar holds thousands of keep-alive
//! connections that are idle nearly all the time. So hyper only runs while a request is being
//! read or answered: once the last response is flushed, the request body is done and the socket
//! has nothing more to read, hyper is stopped between requests (it closes an idle connection at
//! once, without a word on the wire), the socket is taken back and the connection waits for its
//! next bytes with no buffer at all. The next request gets a fresh hyper connection.
//!
//! An HTTP/1.1 `Upgrade` (WebSocket) the upstream accepts with 101 ends hyper's run: the socket
//! is taken back (with any bytes hyper had read past the request) and joined to the upstream's
//! upgraded connection as a byte stream, both directions, half-close respected.
//!
//! The header read timeout is kept here rather than in hyper (which allocates a timer per
//! request head): one timer per connection, armed from the end of an exchange until the next
//! head is complete, covering the idle wait exactly as hyper's did.

use std::{
    convert::Infallible,
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use super::{
    config::Limits,
    drain::Watch,
    http::{ConnCtx, ResponseBody, handle},
    io::DownstreamIo,
    tcp,
};

/// hyper's built-in header count limit (`max_headers` not set).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// A connection whose requests come less than this apart keeps hyper between them (restarting
/// hyper per request would cost a busy connection ~10% more CPU); it is parked once this passes
/// without a request. Any other connection is parked as soon as each exchange ends.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// Serves HTTP/1.1 on a detected connection until the client closes it, its next head does not
/// arrive within the header read timeout, or the drain asks it to finish (the request in flight
/// completes with `connection: close`; an idle connection closes at once).
pub async fn serve(io: DownstreamIo<TcpStream>, ctx: Arc<ConnCtx>, limits: &Limits, drain: Watch) {
    let head_bytes = (limits.max_request_headers_kb as usize).saturating_mul(1024);
    let mut builder = http1::Builder::new();
    builder
        // hyper answers a head larger than this with 431 (its floor is 8 KiB).
        .max_buf_size(head_bytes.max(8192))
        .keep_alive(true);
    // hyper's default is 100 on a stack array; an explicit limit costs a heap array per
    // request, so only set one that differs.
    if limits.max_request_headers as usize != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(limits.max_request_headers as usize);
    }
    Conn {
        builder,
        head_timeout: limits.header_read_timeout.nonzero(),
        ctx,
        drain,
        busy: Busy::default(),
        flags: Arc::new(IoFlags::default()),
        upgrade: Arc::new(std::sync::Mutex::new(None)),
    }
    .run(io)
    .await;
}

/// How a hyper run ended.
enum End {
    /// Stopped between requests; the socket is ours again.
    Parked,
    /// hyper finished the connection (client closed, `connection: close`, drain) or failed.
    Done(hyper::Result<()>),
    /// No complete request head within the header read timeout.
    HeadTimeout,
}

/// How an idle wait ended.
enum Wake {
    Readable,
    Drain,
    HeadTimeout,
    Failed(io::Error),
}

struct Conn {
    builder: http1::Builder,
    head_timeout: Option<Duration>,
    ctx: Arc<ConnCtx>,
    drain: Watch,
    busy: Busy,
    flags: Arc<IoFlags>,
    /// The upstream's side of an upgrade the upstream accepted (101), for the join.
    upgrade: Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>>,
}

impl Conn {
    async fn run(mut self, io: DownstreamIo<TcpStream>) {
        let mut next = Some(io);
        let mut service = Some(self.service());
        // One timer: while hyper runs it fires `PARK_AFTER` after the last exchange (or at the
        // head deadline if that is sooner); while parked, at the head deadline. Under load it
        // is only ever pushed later, which tokio does without touching its wheel.
        let start = Instant::now();
        let mut head_deadline = self.head_timeout.map(|t| start + t);
        let timer = tokio::time::sleep_until(park_deadline(start, head_deadline));
        tokio::pin!(timer);
        // No request is open: the next head is awaited (the first one is, from the start).
        let mut waiting_head = true;
        let mut draining = false;
        // Requests follow each other closely on this connection: hyper stays up between them
        // until `PARK_AFTER` passes without one. A connection that is not (yet) busy like
        // that is parked as soon as each exchange ends.
        let mut hot = false;
        let mut last_end = start;
        // Exchanges started (the service was called) that this loop has accounted for. An
        // exchange answered by the proxy itself (404, 413, 503) can start and end inside one
        // poll of hyper, never seen busy: this count still tells that it happened.
        let mut seen_exchanges = 0;
        while let (Some(mut downstream), Some(svc)) = (next.take(), service.take()) {
            // Bytes handed back by the last hyper (part of a pipelined head) are read at once.
            if !downstream.has_unread() {
                if let Some(deadline) = head_deadline {
                    timer.as_mut().reset(deadline);
                }
                let wake = poll_fn(|cx| {
                    if self.drain.poll_drain(cx).is_ready() {
                        return Poll::Ready(Wake::Drain);
                    }
                    if head_deadline.is_some() && timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Wake::HeadTimeout);
                    }
                    downstream.poll_read_ready(cx).map(|r| match r {
                        Ok(()) => Wake::Readable,
                        Err(err) => Wake::Failed(err),
                    })
                })
                .await;
                match wake {
                    Wake::Readable => hot = last_end.elapsed() < PARK_AFTER,
                    Wake::Drain => {
                        // What hyper does with an idle connection on graceful shutdown.
                        let _ = downstream.shutdown().await;
                        return;
                    }
                    Wake::HeadTimeout => {
                        debug!("no request head within header_read_timeout; closing");
                        return;
                    }
                    Wake::Failed(err) => {
                        debug!(%err, "idle connection failed");
                        return;
                    }
                }
            }
            if waiting_head {
                // Nothing may come after all (a spurious wake-up): park again in time.
                timer
                    .as_mut()
                    .reset(park_deadline(Instant::now(), head_deadline));
            }
            self.flags.reset();
            let io = TokioIo::new(ParkIo {
                io: downstream,
                flags: self.flags.clone(),
            });
            // Boxed: the idle connection's task keeps none of hyper's state inline.
            let mut conn = Box::pin(self.builder.serve_connection(io, svc));
            let end = poll_fn(|cx| {
                if !draining && self.drain.poll_drain(cx).is_ready() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    return Poll::Ready(End::Done(result));
                }
                let started = self.flags.exchanges.load(Ordering::Relaxed);
                if self.busy.open() > 0 {
                    waiting_head = false;
                    seen_exchanges = started;
                    // The exchange may end on another task (the upstream side finishing a
                    // request body after the response went out), which wakes nobody here:
                    // look again every `PARK_AFTER` until it has.
                    while timer.as_mut().poll(cx).is_ready() {
                        timer.as_mut().reset(Instant::now() + PARK_AFTER);
                    }
                    return Poll::Pending;
                }
                if !waiting_head || started != seen_exchanges {
                    seen_exchanges = started;
                    // An exchange just ended.
                    waiting_head = true;
                    let now = Instant::now();
                    last_end = now;
                    head_deadline = self.head_timeout.map(|t| now + t);
                    timer.as_mut().reset(park_deadline(now, head_deadline));
                    if !hot && !draining && self.flags.idle() {
                        return park(conn.as_mut(), &self.flags, cx);
                    }
                }
                while timer.as_mut().poll(cx).is_ready() {
                    let now = Instant::now();
                    if head_deadline.is_some_and(|d| now >= d) {
                        return Poll::Ready(End::HeadTimeout);
                    }
                    if !draining && self.flags.idle() {
                        return park(conn.as_mut(), &self.flags, cx);
                    }
                    // Not now (a partial head, a slow reader): look again later.
                    timer.as_mut().reset(park_deadline(now, head_deadline));
                }
                Poll::Pending
            })
            .await;
            let upgraded = self.upgrade.lock().ok().and_then(|mut u| u.take());
            if let (Some(upstream), End::Parked | End::Done(Ok(()))) = (upgraded, &end) {
                // The 101 went out: the rest of this connection is the upgraded protocol.
                let parts = Pin::into_inner(conn).into_parts();
                let mut downstream = parts.io.into_inner().io;
                if !parts.read_buf.is_empty() {
                    downstream.unread(parts.read_buf);
                }
                join_upgraded(downstream, upstream).await;
                return;
            }
            match end {
                End::Parked => {
                    let parts = Pin::into_inner(conn).into_parts();
                    let mut parked = parts.io.into_inner().io;
                    if !parts.read_buf.is_empty() {
                        parked.unread(parts.read_buf);
                    }
                    next = Some(parked);
                    service = Some(parts.service);
                }
                End::Done(Ok(())) => {}
                End::Done(Err(err)) => debug!(%err, "http connection ended with an error"),
                End::HeadTimeout => debug!("request head incomplete after header_read_timeout"),
            }
        }
    }

    /// The per-request service: `handle`, with the request body and the response each holding
    /// the connection busy until they are done.
    fn service(
        &self,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<TrackedBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<TrackedBody>, Infallible>> + Send,
    > + Send
    + Unpin
    + 'static {
        let ctx = self.ctx.clone();
        let flags = self.flags.clone();
        let upgrade = self.upgrade.clone();
        // Weak: only the exchange's parts may count.
        let busy = Arc::downgrade(&self.busy.0);
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let upgrade = upgrade.clone();
            flags.exchanges.fetch_add(1, Ordering::Relaxed);
            let request_busy = busy.upgrade().map(Busy);
            let response_busy = busy.upgrade().map(Busy);
            async move {
                let req = req.map(|body| DownstreamBody::new(body, request_busy));
                let mut resp = handle(req, &ctx).await;
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(on) = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
                    && let Ok(mut slot) = upgrade.lock()
                {
                    *slot = Some(on);
                }
                Ok(resp.map(|body| TrackedBody {
                    inner: body,
                    _busy: response_busy,
                }))
            }
        })
    }
}

/// Joins an upgraded downstream connection to the upstream's, until both directions end.
async fn join_upgraded(
    mut downstream: DownstreamIo<TcpStream>,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let upgraded = match upstream.await {
        Ok(u) => u,
        Err(err) => {
            debug!(%err, "the upstream's upgraded connection is gone");
            return;
        }
    };
    let mut upstream = TokioIo::new(upgraded);
    match tcp::forward(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
        Err(err) => debug!(%err, "upgraded connection ended with an error"),
    }
}

/// When a connection that is waiting for a head since `since` should be looked at again.
fn park_deadline(since: Instant, head_deadline: Option<Instant>) -> Instant {
    let park = since + PARK_AFTER;
    head_deadline.map_or(park, |d| d.min(park))
}

/// Stops hyper between requests: an idle hyper connection closes at once on graceful shutdown,
/// and the IO ignores the shutdown that follows.
fn park<S>(
    mut conn: Pin<&mut http1::Connection<TokioIo<ParkIo>, S>>,
    flags: &IoFlags,
    cx: &mut Context<'_>,
) -> Poll<End>
where
    S: hyper::service::HttpService<Incoming, ResBody = TrackedBody>,
{
    flags.parking.store(true, Ordering::Relaxed);
    conn.as_mut().graceful_shutdown();
    match conn.poll(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(End::Parked),
        Poll::Ready(Err(err)) => Poll::Ready(End::Done(Err(err))),
        Poll::Pending => {
            // hyper was not idle after all: it finishes this exchange and closes the
            // connection, as on a drain.
            debug!("stopping an idle connection found it busy");
            flags.parking.store(false, Ordering::Relaxed);
            Poll::Pending
        }
    }
}

/// Held by every part of an exchange still in progress (a request body not yet read to the
/// end, a response not yet written): the connection is between requests when only its owner
/// (`Conn`) holds it. The reference count is the counter, so marking costs one increment.
#[derive(Default)]
pub struct Busy(Arc<()>);

impl Busy {
    /// Parts of an exchange still in progress.
    pub fn open(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }

    /// Makes the markers parts of an exchange hold (weak: only they count).
    pub fn weak(&self) -> BusyTokens {
        BusyTokens(Arc::downgrade(&self.0))
    }
}

/// Hands out the markers of one `Busy`.
#[derive(Clone)]
pub struct BusyTokens(std::sync::Weak<()>);

impl BusyTokens {
    pub fn token(&self) -> Option<Busy> {
        self.0.upgrade().map(Busy)
    }
}

/// What one hyper run saw, for telling "between requests" from "busy".
#[derive(Default)]
struct IoFlags {
    /// The last read found the socket empty.
    read_blocked: AtomicBool,
    /// Nothing was written since the last successful flush: hyper's write buffer is empty
    /// (hyper flushes the IO only once it has written out everything it buffered).
    flushed: AtomicBool,
    /// This run has read bytes.
    read_any: AtomicBool,
    /// Times the service was called (a request head was complete) on this connection, across
    /// runs (never reset).
    exchanges: AtomicU64,
    /// `exchanges` when this run started: the run has served a request once they differ.
    exchanges_at_run_start: AtomicU64,
    /// hyper is being stopped between requests: its shutdown of the IO must not reach the
    /// socket.
    parking: AtomicBool,
}

impl IoFlags {
    fn reset(&self) {
        for flag in [&self.read_blocked, &self.read_any, &self.parking] {
            flag.store(false, Ordering::Relaxed);
        }
        self.flushed.store(true, Ordering::Relaxed);
        self.exchanges_at_run_start
            .store(self.exchanges.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// This run has called the service.
    fn served(&self) -> bool {
        self.exchanges.load(Ordering::Relaxed)
            != self.exchanges_at_run_start.load(Ordering::Relaxed)
    }

    /// hyper waits for a request that has not started, with nothing left to write, and
    /// stopping it now loses nothing: after an exchange hyper is idle (it closes at once and
    /// hands back any bytes of a next head); before its first one it only closes at once if it
    /// has read nothing — a partial first head must finish on this run (its response would
    /// otherwise say `connection: close`).
    fn idle(&self) -> bool {
        let get = |flag: &AtomicBool| flag.load(Ordering::Relaxed);
        get(&self.read_blocked) && get(&self.flushed) && (self.served() || !get(&self.read_any))
    }
}

/// The downstream socket as hyper sees it, recording what `IoFlags` needs.
struct ParkIo {
    io: DownstreamIo<TcpStream>,
    flags: Arc<IoFlags>,
}

impl AsyncRead for ParkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.flags
            .read_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        if buf.filled().len() > before {
            this.flags.read_any.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for ParkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flags.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flags.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.flags.flushed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flags.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A downstream request body. On HTTP/1 it keeps its connection busy until it is read to the
/// end or dropped.
pub struct DownstreamBody {
    inner: Incoming,
    busy: Option<Busy>,
}

impl DownstreamBody {
    pub fn new(inner: Incoming, busy: Option<Busy>) -> Self {
        let mut body = Self { inner, busy };
        if body.inner.is_end_stream() {
            body.busy = None;
        }
        body
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its connection busy until hyper is done with it.
pub struct TrackedBody {
    inner: ResponseBody,
    _busy: Option<Busy>,
}

impl TrackedBody {
    pub fn new(inner: ResponseBody, busy: Option<Busy>) -> Self {
        Self { inner, _busy: busy }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
