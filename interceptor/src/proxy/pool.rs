//! Upstream connections. HTTP/1.1 with keep-alive: per endpoint, idle connections are reused
//! newest first; a connection goes back to the pool when its response body has been read to the
//! end (a body dropped early closes it: its framing is unknown). HTTP/2 (h2c prior knowledge):
//! per endpoint, requests share a connection as streams, up to the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS and our own cap; beyond that a new connection is opened. An h2
//! connection with no stream for the idle timeout is closed. One pool per data-plane worker, so
//! the pool lock is never contended and a connection's task runs on its user's thread.
//!
//! A pooled connection the upstream closed while idle is detected before use (`ready` fails, or
//! hyper hands the request back unsent) and the next one — or a new one — is tried: such a request
//! was never sent, so this is not a retry.
//!
//! An HTTP/1.1 `Upgrade` request gets a connection of its own that never returns to the pool: once
//! the upstream answers 101 it carries the upgraded protocol.

mod h2c;
mod heard;

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

use self::{
    h2c::{BoxError, H2Body, Pipe, PipeError},
    heard::{Heard, HeardIo},
};
use super::cluster::{UpstreamBody, connect};

/// The builder's stream limit, which h2 reports until it has applied the peer's first
/// SETTINGS: above any u32, so never a peer's value.
const NOT_YET_APPLIED: usize = usize::MAX - 1;

/// Idle connections kept per endpoint (more are closed when they come back).
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Upstream h2 windows and send buffer: hyper's client defaults, kept from when this pool used
/// hyper's client.
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONN_WINDOW: u32 = 5 * 1024 * 1024;
const H2_MAX_SEND_BUF: usize = 1024 * 1024;

#[cfg(test)]
thread_local! {
    /// Tests: the first stream id of new upstream h2 connections, to reach the end of the id
    /// space in one request.
    static FIRST_STREAM_ID: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{addr} does not speak HTTP/2 (h2c prior knowledge): it closed the connection before \
         its SETTINGS; declare the port or cluster `http1`, or serve h2c there"
    )]
    NotHttp2 { addr: SocketAddr },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("HTTP/2 request to {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("request body to {addr}: {source}")]
    Body {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
}

impl SendError {
    fn from_pipe(addr: SocketAddr, err: PipeError) -> Self {
        match err {
            PipeError::Body(source) => SendError::Body { addr, source },
            PipeError::H2(source) => SendError::H2 { addr, source },
        }
    }
}

/// How upstream HTTP/2 connections behave (from the config's limits, read per request so a
/// reload applies to new connections).
#[derive(Clone, Copy, Debug)]
pub struct H2Settings {
    /// Streams at once on one connection (also capped by the peer's setting).
    pub max_requests_per_connection: usize,
    /// h2 PINGs while a stream waits (off by default: servers limit their rate).
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// TCP keep-alive probes after this long idle (the kernel's, invisible to the peer's h2).
    pub tcp_keepalive: Option<Duration>,
    pub max_header_list_size: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            max_requests_per_connection: 100,
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(20),
            tcp_keepalive: None,
            max_header_list_size: 60 * 1024,
        }
    }
}

#[derive(Debug)]
pub struct Pool {
    connect_timeout: Duration,
    idle_timeout: Duration,
    bind: Option<(Ipv4Addr, Ipv6Addr)>,
    idle: Mutex<IdleSet>,
    h2: Mutex<HashMap<SocketAddr, Vec<H2Conn>>>,
    /// One h2 connection is being opened per endpoint at a time, so a burst of first requests
    /// shares it instead of opening one connection each; if that open fails, the requests
    /// that waited for it fail with it.
    h2_opening: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<OpenFailed>>>>>,
    /// Endpoints found not to speak h2c, and when: `auto` requests go to them as HTTP/1.1
    /// (for an idle timeout, then h2c is tried again).
    h1_only: Mutex<HashMap<SocketAddr, Instant>>,
    /// This pool, for the idle sweeper (which must not keep it alive).
    me: std::sync::Weak<Pool>,
    /// An idle sweeper task is scheduled.
    sweeping: std::sync::atomic::AtomicBool,
    /// The sweeper, aborted when the pool goes (config reloads rebuild pools).
    sweeper: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(Some(task)) = self.sweeper.get_mut().map(Option::take) {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct H2Conn {
    sender: h2::client::SendRequest<Bytes>,
    state: Arc<H2State>,
}

/// What the pool and the connection's task share about one h2 connection.
#[derive(Debug)]
struct H2State {
    /// The connection's task has ended, or the peer sent GOAWAY: no new streams.
    closed: AtomicBool,
    streams: AtomicUsize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS as the connection last saw it.
    peer_max_streams: AtomicUsize,
    /// When the last stream ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// The pool's idle timeout, which also bounds how long a request body whose response has
    /// ended waits for window (`h2c::spawn_pipe`).
    idle_timeout: Duration,
}

impl H2State {
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.idle_since
            .lock()
            .ok()
            .map(|since| now.saturating_duration_since(*since))
    }
}

/// Marks an h2 connection closed when its task ends, and takes it out of the pool: `take_h2`
/// prunes only the address it is asked for, so a closed connection to an endpoint that gets no
/// more requests would otherwise stay listed for good, its `SendRequest` keeping h2's shared
/// state (stream slab, buffers) alive.
struct ClosedOnDrop {
    state: Arc<H2State>,
    pool: std::sync::Weak<Pool>,
    addr: SocketAddr,
}

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::Release);
        if let Some(pool) = self.pool.upgrade() {
            pool.prune_h2(self.addr);
        }
    }
}

/// Why an h2 connection could not be opened, told to the requests that waited for it.
///
/// Each retrying the open in turn would hold the last of a burst for one connect timeout per
/// request ahead of it (16 × 10 s for h2load's 16 streams to an endpoint that accepts and
/// never answers); Envoy fails a pool's pending requests with the connect failure too.
#[derive(Debug)]
struct OpenFailed {
    not_http2: bool,
    kind: io::ErrorKind,
    message: String,
}

impl OpenFailed {
    fn new(err: &SendError) -> Self {
        let (kind, message) = match err {
            SendError::Connect { source, .. } => (source.kind(), source.to_string()),
            other => (io::ErrorKind::Other, other.to_string()),
        };
        Self {
            not_http2: matches!(err, SendError::NotHttp2 { .. }),
            kind,
            message,
        }
    }

    fn error(&self, addr: SocketAddr) -> SendError {
        if self.not_http2 {
            return SendError::NotHttp2 { addr };
        }
        SendError::Connect {
            addr,
            source: io::Error::new(self.kind, self.message.clone()),
        }
    }
}

/// One stream on an h2 connection, counted until dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<H2State>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut since) = self.0.idle_since.lock()
        {
            *since = Instant::now();
        }
    }
}

#[derive(Debug)]
struct IdleSet {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    /// Expired connections to every address are dropped at most this often (on `put`), so
    /// destinations never contacted again do not keep connections open.
    last_sweep: Instant,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

impl Pool {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        bind: Option<(Ipv4Addr, Ipv6Addr)>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            sweeper: Mutex::new(None),
            connect_timeout,
            idle_timeout,
            bind,
            idle: Mutex::new(IdleSet {
                by_addr: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            h2: Mutex::new(HashMap::new()),
            h2_opening: Mutex::new(HashMap::new()),
            h1_only: Mutex::new(HashMap::new()),
        })
    }

    /// Open upstream HTTP/2 connections (all endpoints).
    pub fn h2_connections(&self) -> usize {
        self.h2
            .lock()
            .map(|m| {
                m.values()
                    .flatten()
                    .filter(|c| !c.state.closed.load(Ordering::Acquire))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Streams counted open on upstream HTTP/2 connections (all endpoints): Envoy's
    /// `upstream_rq_active` for h2. A stream stays counted until h2 is done with it too (its
    /// request body sent as well as its response ended).
    pub fn h2_streams(&self) -> usize {
        self.h2
            .lock()
            .map(|m| {
                m.values()
                    .flatten()
                    .map(|c| c.state.streams.load(Ordering::Acquire))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Idle connections held now (all endpoints).
    pub fn idle_connections(&self) -> usize {
        self.idle
            .lock()
            .map(|m| m.by_addr.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    fn take(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.by_addr.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if !i.sender.is_closed() && now.duration_since(i.since) < self.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let now = Instant::now();
            let timeout = self.idle_timeout;
            let live = |i: &Idle| !i.sender.is_closed() && now.duration_since(i.since) < timeout;
            if now.duration_since(idle.last_sweep) >= timeout / 2 {
                idle.by_addr.retain(|_, list| {
                    list.retain(live);
                    !list.is_empty()
                });
                idle.last_sweep = now;
            }
            let list = idle.by_addr.entry(addr).or_default();
            list.retain(live);
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(Idle { sender, since: now });
            }
        }
        self.schedule_sweep();
    }

    /// Idle connections are closed once past their idle timeout (within 1.5 × of it) even if no
    /// request ever comes again (Envoy closes them too): after a burst, the sweep on `put` alone left up to 256 idle
    /// connections per endpoint open for good — their descriptors, and the datapath's sockhash
    /// and original-destination entries of the app hop (node-scale benchmark: 250 of each after
    /// 9 000 connections closed). One task per pool while it holds idle connections.
    fn schedule_sweep(&self) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let me = self.me.clone();
        let period = (self.idle_timeout / 2).max(Duration::from_millis(10));
        let task = runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = me.upgrade() else { return };
                if pool.sweep_idle() > 0 {
                    continue;
                }
                pool.sweeping.store(false, Ordering::Release);
                // A put between the sweep and the store saw `sweeping` set and left it to us.
                if pool.idle_connections() == 0 || pool.sweeping.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
        if let Ok(mut slot) = self.sweeper.lock() {
            *slot = Some(task.abort_handle());
        }
    }

    /// Drops expired and closed idle connections; returns how many are left.
    fn sweep_idle(&self) -> usize {
        let Ok(mut idle) = self.idle.lock() else {
            return 0;
        };
        let now = Instant::now();
        let timeout = self.idle_timeout;
        idle.by_addr.retain(|_, list| {
            list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < timeout);
            !list.is_empty()
        });
        idle.last_sweep = now;
        idle.by_addr.values().map(Vec::len).sum()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<TcpStream, SendError> {
        let source = self.bind.map(|(v4, v6)| match addr {
            SocketAddr::V4(_) => IpAddr::V4(v4),
            SocketAddr::V6(_) => IpAddr::V6(v6),
        });
        let stream = match tokio::time::timeout(self.connect_timeout, connect(source, addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
            Err(_) => {
                return Err(SendError::Connect {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", self.connect_timeout),
                    ),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn open(&self, addr: SocketAddr) -> Result<SendRequest<UpstreamBody>, SendError> {
        let stream = self.dial(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Request { addr, source })?;
        tokio::spawn(async move {
            // Ends when the upstream or the pool closes the connection.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends an HTTP/1.1 `Upgrade` request on a connection of its own. A 101 response carries
    /// the upgraded connection (`hyper::upgrade::on`); the connection is never pooled.
    pub async fn send_upgrade(
        &self,
        addr: SocketAddr,
        req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let stream = self.dial(addr).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Request { addr, source })?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
            .ready()
            .await
            .map_err(|source| SendError::Request { addr, source })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| SendError::Request { addr, source })?;
        let (head, body) = resp.into_parts();
        Ok(Response::from_parts(
            head,
            PooledBody {
                body: Inner::H1(body),
                release: None,
                trailers: None,
            },
        ))
    }

    fn is_h1_only(&self, addr: SocketAddr) -> bool {
        let Ok(mut m) = self.h1_only.lock() else {
            return false;
        };
        match m.get(&addr) {
            Some(since) if since.elapsed() < self.idle_timeout => true,
            Some(_) => {
                m.remove(&addr);
                false
            }
            None => false,
        }
    }

    /// Drops the closed h2 connections to `addr` (and its entry, once none is left).
    fn prune_h2(&self, addr: SocketAddr) {
        if let Ok(mut all) = self.h2.lock()
            && let Some(list) = all.get_mut(&addr)
        {
            list.retain(|c| !c.state.closed.load(Ordering::Acquire));
            if list.is_empty() {
                all.remove(&addr);
            }
        }
    }

    /// A stream on an open h2 connection to `addr` with room for one more, if there is one.
    fn take_h2(
        &self,
        addr: SocketAddr,
        settings: &H2Settings,
    ) -> Option<(h2::client::SendRequest<Bytes>, StreamGuard)> {
        let mut all = self.h2.lock().ok()?;
        let list = all.get_mut(&addr)?;
        list.retain(|c| !c.state.closed.load(Ordering::Acquire));
        let cap = settings.max_requests_per_connection.max(1);
        for c in list.iter() {
            let limit = cap.min(c.state.peer_max_streams.load(Ordering::Acquire));
            let state = &c.state;
            let taken = state
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok();
            if taken {
                return Some((c.sender.clone(), StreamGuard(state.clone())));
            }
        }
        None
    }

    async fn open_h2(&self, addr: SocketAddr, settings: &H2Settings) -> Result<(), SendError> {
        let stream = self.dial(addr).await?;
        if let Some(idle) = settings.tcp_keepalive {
            // Three probes over the PING timeout: a vanished peer is found about as soon as an
            // unanswered PING would find it.
            let every = (settings.keepalive_timeout / 3).max(Duration::from_secs(1));
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(every)
                .with_retries(3);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        }
        let (socket, mut heard) = HeardIo::new(stream);
        let mut builder = h2::client::Builder::new();
        builder
            // A value no SETTINGS frame can carry (a u32), so the connection's task knows
            // whether h2 has applied the peer's SETTINGS yet. Nothing is sent before the pool
            // has read the peer's first SETTINGS, and then no more streams than it allows.
            .initial_max_send_streams(NOT_YET_APPLIED)
            .max_header_list_size(settings.max_header_list_size)
            // hyper's client defaults, which this pool used before it drove h2 itself.
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_send_buffer_size(H2_MAX_SEND_BUF)
            .max_frame_size(16 * 1024)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false);
        #[cfg(test)]
        if let Some(id) = FIRST_STREAM_ID.with(std::cell::Cell::get) {
            builder.initial_stream_id(id);
        }
        let (sender, mut conn) = builder
            .handshake::<_, Bytes>(socket)
            .await
            .map_err(|source| SendError::H2 { addr, source })?;
        let state = Arc::new(H2State {
            closed: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            peer_max_streams: AtomicUsize::new(usize::MAX),
            idle_since: Mutex::new(Instant::now()),
            idle_timeout: self.idle_timeout,
        });
        let idle_timeout = self.idle_timeout;
        let keepalive = settings
            .keepalive_interval
            .map(|every| (every, settings.keepalive_timeout));
        let mut pinger = keepalive.and_then(|_| conn.ping_pong());
        let watched = state.clone();
        let closed = ClosedOnDrop {
            state: state.clone(),
            pool: self.me.clone(),
            addr,
        };
        tokio::spawn(async move {
            // Marks the connection closed however the task ends (or is dropped).
            let _closed = closed;
            // Runs the connection until the upstream closes it, until no stream has been open
            // for the idle timeout (dropping it closes the socket), or until a keep-alive PING
            // goes unanswered.
            let mut conn = std::pin::pin!(conn);
            let mut next_ping = keepalive.map(|(every, _)| Instant::now() + every);
            loop {
                let now = Instant::now();
                let mut wait = match watched.idle_for(now) {
                    Some(idle) if idle >= idle_timeout => return,
                    Some(idle) => idle_timeout - idle,
                    None => idle_timeout,
                };
                if let Some(at) = next_ping {
                    wait = wait.min(at.saturating_duration_since(now));
                }
                // Each poll also publishes the peer's current stream limit (a later SETTINGS
                // frame can change it); the first one comes from `heard`.
                let run = std::future::poll_fn(|cx| {
                    let polled = conn.as_mut().poll(cx);
                    let peer = conn.max_concurrent_send_streams();
                    // Before h2 has applied the peer's first SETTINGS it reports the
                    // builder's value; after, every limit it reports is the peer's (a 1 too,
                    // however soon after the first SETTINGS it came).
                    if peer != NOT_YET_APPLIED {
                        watched.peer_max_streams.store(peer, Ordering::Release);
                    }
                    polled
                });
                // Biased: the connection first, and no random draw on every wake-up.
                tokio::select! {
                    biased;
                    _ = run => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let (Some(at), Some((every, timeout)), Some(pinger)) =
                    (next_ping, keepalive, pinger.as_mut())
                else {
                    continue;
                };
                let now = Instant::now();
                if now < at {
                    continue;
                }
                next_ping = Some(now + every);
                // Pings only while a stream waits on the peer (hyper's default): an idle
                // connection has its idle timeout.
                if watched.streams.load(Ordering::Acquire) == 0 {
                    continue;
                }
                if pinger.send_ping(h2::Ping::opaque()).is_err() {
                    return;
                }
                let run = std::future::poll_fn(|cx| conn.as_mut().poll(cx));
                let pong = std::future::poll_fn(|cx| pinger.poll_pong(cx));
                tokio::select! {
                    biased;
                    _ = run => return,
                    r = pong => if r.is_err() { return },
                    () = tokio::time::sleep(timeout) => {
                        tracing::debug!(%addr, ?timeout, "upstream h2 keep-alive PING unanswered; closing");
                        return;
                    }
                }
            }
        });
        // The peer's SETTINGS come within a round trip and say how many streams it takes;
        // until then requests waiting to share this connection would all pile onto it. A
        // peer that accepted the connection but never answers is a failed connect.
        let waited = tokio::time::timeout(
            self.connect_timeout,
            heard.wait_for(|h| *h != Heard::Waiting),
        )
        .await;
        let max_streams = match waited {
            Ok(Ok(h)) => match *h {
                Heard::Settings {
                    max_concurrent_streams,
                } => max_concurrent_streams.map_or(usize::MAX, |n| n as usize),
                Heard::Waiting | Heard::NotHttp2 => return Err(SendError::NotHttp2 { addr }),
            },
            // The connection ended before its first frame.
            Ok(Err(_)) => return Err(SendError::NotHttp2 { addr }),
            Err(_) => {
                return Err(SendError::Connect {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no HTTP/2 SETTINGS within the connect timeout ({:?}): the peer \
                             accepted the connection but does not answer h2c; check that it \
                             serves HTTP/2 there, or declare the port `http1`",
                            self.connect_timeout
                        ),
                    ),
                });
            }
        };
        // Unless the connection's task has published h2's word already, which may be a later
        // SETTINGS than the first.
        let _ = state.peer_max_streams.compare_exchange(
            usize::MAX,
            max_streams,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // Checked under the lock: a task ending after this check prunes the entry once the
        // lock is free (it marks the connection closed before taking the lock).
        let mut all = self.h2.lock().map_err(|_| SendError::NotHttp2 { addr })?;
        if state.closed.load(Ordering::Acquire) {
            return Err(SendError::NotHttp2 { addr });
        }
        all.entry(addr).or_default().push(H2Conn { sender, state });
        Ok(())
    }

    /// Sends `req` (absolute URI: its authority becomes `:authority`) to `addr` as a stream on
    /// a shared h2 connection.
    ///
    /// With `fallback` (h2 only because the client spoke it), an endpoint that turns out not
    /// to speak h2c gets the request as HTTP/1.1 instead — it was never sent.
    pub async fn send_h2(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
        settings: &H2Settings,
        fallback: bool,
    ) -> Result<Response<PooledBody>, SendError> {
        if fallback && self.is_h1_only(addr) {
            return Box::pin(self.send(addr, as_http1(req))).await;
        }
        // Twice at most: a connection found closing hands the request back unsent.
        for _ in 0..2 {
            let (sender, guard) = match self.take_h2(addr, settings) {
                Some(taken) => taken,
                None => {
                    let lock = self
                        .h2_opening
                        .lock()
                        .map(|mut m| m.entry(addr).or_default().clone())
                        .unwrap_or_default();
                    let mut opening = lock.lock().await;
                    let taken = match self.take_h2(addr, settings) {
                        Some(taken) => taken,
                        None => {
                            if let Some(failed) = opening.as_ref() {
                                if failed.not_http2 && fallback {
                                    drop(opening);
                                    return Box::pin(self.send(addr, as_http1(req))).await;
                                }
                                return Err(failed.error(addr));
                            }
                            // Boxed, as every rarely taken branch here: a request's future (moved
                            // whole when its stream's task is spawned) stays small.
                            let opened = Box::pin(self.open_h2(addr, settings)).await;
                            // Only this open's entry: a later open may have replaced it.
                            if let Ok(mut m) = self.h2_opening.lock()
                                && m.get(&addr).is_some_and(|l| Arc::ptr_eq(l, &lock))
                            {
                                m.remove(&addr);
                            }
                            if let Err(err) = &opened {
                                *opening = Some(OpenFailed::new(err));
                            }
                            match opened {
                                Err(SendError::NotHttp2 { .. }) if fallback => {
                                    tracing::debug!(%addr, "no h2c there; HTTP/1.1 instead");
                                    if let Ok(mut m) = self.h1_only.lock() {
                                        m.insert(addr, Instant::now());
                                    }
                                    drop(opening);
                                    return Box::pin(self.send(addr, as_http1(req))).await;
                                }
                                other => other?,
                            }
                            self.take_h2(addr, settings)
                                .ok_or_else(|| SendError::Connect {
                                    addr,
                                    source: io::Error::other("the new HTTP/2 connection closed"),
                                })?
                        }
                    };
                    drop(opening);
                    taken
                }
            };
            match send_on(addr, sender, guard, req).await {
                Ok(resp) => return Ok(resp),
                Err(NotSent::Closing(unsent)) => req = *unsent,
                Err(NotSent::Failed(err)) => return Err(err),
            }
        }
        Err(SendError::Connect {
            addr,
            source: io::Error::other("every HTTP/2 connection tried was closing"),
        })
    }

    /// Sends `req` (origin-form URI, `Host` set) to `addr` over an idle or new connection.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        while let Some(mut sender) = self.take(addr) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender, addr)),
                Err(mut err) => match err.take_message() {
                    // Closed before the request went out: try the next connection.
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(SendError::Request {
                            addr,
                            source: err.into_error(),
                        });
                    }
                },
            }
        }
        let mut sender = Box::pin(self.open(addr)).await?;
        sender
            .ready()
            .await
            .map_err(|source| SendError::Request { addr, source })?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.wrap(resp, sender, addr)),
            Err(err) => Err(SendError::Request {
                addr,
                source: err.into_error(),
            }),
        }
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<UpstreamBody>,
        addr: SocketAddr,
    ) -> Response<PooledBody> {
        let (head, body) = resp.into_parts();
        let mut pooled = PooledBody {
            body: Inner::H1(body),
            release: Some(Release::Connection(self.clone(), sender, addr)),
            trailers: None,
        };
        pooled.release_if_done();
        Response::from_parts(head, pooled)
    }
}

/// Why [`send_on`] gave no response.
enum NotSent {
    /// The connection was closing: the request, never sent, for another one.
    Closing(Box<Request<UpstreamBody>>),
    Failed(SendError),
}

/// Sends `req` as a stream on `sender`'s connection and waits for the response head, all from
/// the caller's task; the body goes out from here too when it is already complete.
async fn send_on(
    addr: SocketAddr,
    sender: h2::client::SendRequest<Bytes>,
    guard: StreamGuard,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, NotSent> {
    let closing = |err: &h2::Error| err.is_go_away() || err.is_io() || err.is_remote();
    // `ready` takes no request: any error is the connection's (GOAWAY, I/O, or its stream ids
    // used up — a user error in h2 that would otherwise leave it first in the pool, failing
    // every request to the endpoint), so it is retired and the request tried elsewhere.
    let mut sender = match sender.ready().await {
        Ok(s) => s,
        Err(_) => {
            guard.0.closed.store(true, Ordering::Release);
            return Err(NotSent::Closing(Box::new(req)));
        }
    };
    let (mut parts, body) = req.into_parts();
    h2c::set_content_length(&mut parts.headers, &parts.method, &body);
    let eos = body.is_end_stream();
    let head = Request::from_parts(parts, ());
    // `ready` just checked the connection, on this thread, which also runs the connection's
    // task: a failure here is the request's own, never a connection found closing in between.
    let (response, send) = match sender.send_request(head, eos) {
        Ok(sent) => sent,
        Err(err) => {
            if closing(&err) {
                guard.0.closed.store(true, Ordering::Release);
            }
            return Err(NotSent::Failed(SendError::H2 { addr, source: err }));
        }
    };
    let sending = if eos {
        Sending::Sent(guard)
    } else {
        // Eagerly: a body already complete goes out now, without a task of its own.
        let mut pipe = Pipe::new(body, send);
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx))).await {
            Poll::Ready(Ok(())) => Sending::Sent(guard),
            Poll::Ready(Err(err)) => return Err(NotSent::Failed(SendError::from_pipe(addr, err))),
            // The guard goes with the pipe: h2 counts the stream open until the body is sent
            // too, however early the response ends, and the pool's count must not drop before
            // h2's, or the pool admits streams that h2 holds back, unopened and with no
            // timeout, past the peer's limit.
            Poll::Pending => Sending::Piped(h2c::spawn_pipe(pipe, guard)),
        }
    };
    let resp = match response.await {
        Ok(resp) => resp,
        Err(source) => {
            // A spawned body that failed reset the stream itself: the client's error, not
            // the upstream's.
            if let Sending::Piped(cancel) = &sending
                && let Some(source) = cancel.body_failure()
            {
                return Err(NotSent::Failed(SendError::Body { addr, source }));
            }
            return Err(NotSent::Failed(SendError::H2 { addr, source }));
        }
    };
    let count = match sending {
        Sending::Sent(guard) => StreamCount::Own(guard),
        Sending::Piped(cancel) => StreamCount::Shared(cancel.disarm()),
    };
    let (head, recv) = resp.into_parts();
    let mut pooled = PooledBody {
        body: Inner::H2(H2Body::new(recv)),
        release: Some(Release::Stream(count)),
        trailers: None,
    };
    pooled.release_if_done();
    Ok(Response::from_parts(head, pooled))
}

/// An h2-shaped request (absolute URI) as HTTP/1.1: origin-form target, the authority as
/// `Host`.
fn as_http1(req: Request<UpstreamBody>) -> Request<UpstreamBody> {
    let (mut parts, body) = req.into_parts();
    if !parts.headers.contains_key(http::header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .cloned()
        .map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
    parts.version = http::Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// A response body that returns its connection to the pool (HTTP/1.1) or ends its stream's
/// count (HTTP/2) once read to the end.
pub struct PooledBody {
    body: Inner,
    release: Option<Release>,
    /// Told the trailers (or `None`) when the body ends.
    trailers: Option<TrailersHook>,
}

/// An HTTP/1.1 response as hyper reads it, or an h2 stream as the h2 crate does.
enum Inner {
    H1(Incoming),
    H2(H2Body),
}

impl Inner {
    fn is_end_stream(&self) -> bool {
        match self {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }
}

/// Told once, at the end of a response body, its trailers if any: a concrete type rather than
/// a boxed closure, which would cost an allocation per gRPC call.
pub type TrailersHook = super::http::GrpcStatusHook;

enum Release {
    Connection(Arc<Pool>, SendRequest<UpstreamBody>, SocketAddr),
    Stream(StreamCount),
}

/// A stream's place in its connection's count: the response's alone, or shared with the task
/// still sending the request body.
#[derive(Debug)]
#[expect(dead_code, reason = "held for its Drop, which ends the count")]
enum StreamCount {
    Own(StreamGuard),
    Shared(Arc<h2c::PipeShared>),
}

/// How a request's body went: whole before the response was awaited, or by a task of its own.
enum Sending {
    Sent(StreamGuard),
    Piped(h2c::Cancel),
}

impl Release {
    fn done(self) {
        match self {
            Release::Connection(pool, sender, addr) => pool.put(addr, sender),
            Release::Stream(guard) => drop(guard),
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    /// Tells `hook` the trailers when the body ends (`None` if it has none).
    pub fn on_trailers(&mut self, hook: TrailersHook) {
        if self.body.is_end_stream() {
            hook.ended(None);
        } else {
            self.trailers = Some(hook);
        }
    }

    fn release_if_done(&mut self) {
        if self.body.is_end_stream()
            && let Some(release) = self.release.take()
        {
            release.done();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.body {
            Inner::H1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Inner::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(hook) = this.trailers.take()
        {
            hook.ended(Some(trailers));
        }
        match &polled {
            Poll::Ready(None) => {
                if let Some(hook) = this.trailers.take() {
                    hook.ended(None);
                }
                if let Some(release) = this.release.take() {
                    release.done();
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(Some(Err(_))) => this.release = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<UpstreamBody> {
        Request::get("/")
            .header("host", "x")
            .body(http_body_util::Either::Left(Full::new(Bytes::new())))
            .expect("request")
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read_and_not_before() {
        let (addr, accepted) = server().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60), None);
        for _ in 0..3 {
            let resp = pool.send(addr, get()).await.expect("response");
            resp.into_body().collect().await.expect("body");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A response still being read holds its connection: a second request opens another.
        let held = pool.send(addr, get()).await.expect("response");
        let other = pool.send(addr, get()).await.expect("response");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop((held, other));
    }

    #[tokio::test]
    async fn idle_connections_close_at_their_timeout_without_further_requests() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
            });
            // Serving ends when the client closes the connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            let _ = closed_tx.send(());
        });
        let pool = Pool::new(Duration::from_secs(1), Duration::from_millis(100), None);
        let resp = pool.send(addr, get()).await.expect("response");
        resp.into_body().collect().await.expect("body");
        assert_eq!(pool.idle_connections(), 1);
        // No request follows: the connection must still be closed, by the pool, soon after 100 ms.
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("the idle connection was never closed")
            .expect("server task");
        assert_eq!(pool.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_closed_h2_connection_leaves_the_pool_without_further_requests() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(stream).await.expect("handshake");
            if let Some(Ok((_req, mut respond))) = conn.accept().await {
                let resp = Response::builder().status(200).body(()).expect("response");
                let _ = respond.send_response(resp, true);
            }
            // Served one request; now the connection closes (the socket with it).
            let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
        });
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60), None);
        let req = Request::get("http://x/")
            .body(http_body_util::Either::Left(Full::new(Bytes::new())))
            .expect("request");
        let resp = pool
            .send_h2(addr, req, &H2Settings::default(), false)
            .await
            .expect("response");
        resp.into_body().collect().await.expect("body");
        // No request to `addr` follows: the closed connection must still leave the pool.
        let mut listed = 1;
        for _ in 0..100 {
            listed = pool.h2.lock().map(|m| m.len()).unwrap_or(0);
            if listed == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(listed, 0, "a closed h2 connection stayed in the pool");
    }

    /// A connection whose stream ids are used up fails `ready` with a user error (not GOAWAY,
    /// not I/O): it must be retired and the request sent on a new one, not left first in the
    /// pool failing every request to the endpoint.
    #[tokio::test]
    async fn a_connection_out_of_stream_ids_is_retired_not_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        let resp = Response::builder().status(200).body(()).expect("response");
                        let _ = respond.send_response(resp, true);
                    }
                });
            }
        });
        // Every new connection's first stream is its last (2^31 - 1).
        FIRST_STREAM_ID.with(|id| id.set(Some(0x7fff_ffff)));
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60), None);
        for i in 0..3 {
            let req = Request::get("http://x/")
                .body(http_body_util::Either::Left(Full::new(Bytes::new())))
                .expect("request");
            let resp = pool
                .send_h2(addr, req, &H2Settings::default(), false)
                .await
                .unwrap_or_else(|err| panic!("request {i}: {err}"));
            resp.into_body().collect().await.expect("body");
        }
        FIRST_STREAM_ID.with(|id| id.set(None));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "one connection per request"
        );
    }

    #[tokio::test]
    async fn expired_idle_connections_are_swept() {
        let (addr, _) = server().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_millis(50), None);
        let resp = pool.send(addr, get()).await.expect("response");
        resp.into_body().collect().await.expect("body");
        assert_eq!(pool.idle_connections(), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Any later put sweeps every address.
        let (other, _) = server().await;
        let resp = pool.send(other, get()).await.expect("response");
        resp.into_body().collect().await.expect("body");
        assert_eq!(pool.idle_connections(), 1, "only the fresh one is kept");
    }
}
