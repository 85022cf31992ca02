//! Upstream HTTP/1.1 connections with keep-alive: per endpoint, idle connections are reused
//! newest first; a connection goes back to the pool when its response body has been read to the
//! end (a body dropped early closes it: its framing is unknown). One pool per data-plane worker,
//! so the pool lock is never contended and a connection's task runs on its user's thread.
//!
//! A pooled connection the upstream closed while idle is detected before use (`ready` fails, or
//! hyper hands the request back unsent) and the next one — or a new one — is tried: such a request
//! was never sent, so this is not a retry.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
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
use tokio::time::Instant;

use super::cluster::{UpstreamBody, connect};

/// Idle connections kept per endpoint (more are closed when they come back).
const MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

#[derive(Debug)]
pub struct Pool {
    connect_timeout: Duration,
    idle_timeout: Duration,
    bind: Option<(Ipv4Addr, Ipv6Addr)>,
    idle: Mutex<IdleSet>,
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
        Arc::new(Self {
            connect_timeout,
            idle_timeout,
            bind,
            idle: Mutex::new(IdleSet {
                by_addr: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        })
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
    }

    async fn open(&self, addr: SocketAddr) -> Result<SendRequest<UpstreamBody>, SendError> {
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
        let mut sender = self.open(addr).await?;
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
            body,
            release: Some((self.clone(), sender, addr)),
        };
        pooled.release_if_done();
        Response::from_parts(head, pooled)
    }
}

/// A response body that returns its connection to the pool once read to the end.
pub struct PooledBody {
    body: Incoming,
    release: Option<(Arc<Pool>, SendRequest<UpstreamBody>, SocketAddr)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn release_if_done(&mut self) {
        if self.body.is_end_stream()
            && let Some((pool, sender, addr)) = self.release.take()
        {
            pool.put(addr, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((pool, sender, addr)) = this.release.take() {
                    pool.put(addr, sender);
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
        self.body.size_hint()
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
