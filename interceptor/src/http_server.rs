//! One small HTTP/1 server for the proxy's and agent's own endpoints (metrics, health, admin),
//! drained with everything else on shutdown.
//!
//! These ports face the node (kubelet probes, Prometheus), so a slow or greedy client must not
//! pin the process: request heads must arrive within a header timeout, a connection lives for a
//! bounded time (then closes between requests), and only so many are served at once — a new
//! client past that asks the oldest connection to close, so long-lived or idle connections can
//! never lock a kubelet probe out. See [`Limits`].

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, TryAcquireError},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::socket::accept_with_backoff;

pub type Body = Full<Bytes>;

/// A request handler: plain function of the request head.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Body> + Send + Sync>;

/// What one client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest wait for a request head, including the idle time before it on a kept-alive
    /// connection.
    pub header_timeout: Duration,
    /// A kept-alive connection is closed (between requests) after this long.
    pub max_connection_age: Duration,
    /// Connections served at once; one more evicts the oldest.
    pub max_connections: usize,
    /// How long an in-flight request may take to finish once the server stops.
    pub drain_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(300),
            max_connections: 64,
            drain_grace: Duration::from_secs(5),
        }
    }
}

/// The registry in the OpenMetrics text format (what Prometheus negotiates), or 500.
pub fn openmetrics(registry: &prometheus_client::registry::Registry) -> Response<Body> {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => {
            let mut resp = text(StatusCode::OK, out);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        ),
    }
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Serves `handler` on `listener` until `stop` is cancelled, with the default [`Limits`].
pub async fn serve(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    serve_with(listener, handler, stop, Limits::default()).await
}

pub async fn serve_with(
    listener: TcpListener,
    handler: Handler,
    stop: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // One token per live connection, oldest first; a connection's task cancels its own token
    // when it ends, so a cancelled token is a finished (or evicted) connection.
    let mut live: VecDeque<CancellationToken> = VecDeque::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = accept_with_backoff(&listener) => accepted,
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                // Full: the oldest connection closes (at once when idle, after its request
                // otherwise, within `drain_grace` at worst) and the new one takes its slot.
                if let Some(oldest) = live.iter().find(|t| !t.is_cancelled()) {
                    debug!(%peer, "endpoint connections at their limit; closing the oldest");
                    oldest.cancel();
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        live.retain(|t| !t.is_cancelled());
        let evict = CancellationToken::new();
        live.push_back(evict.clone());
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = evict.clone().drop_guard();
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = handler(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let finished = tokio::select! {
                res = conn.as_mut() => Some(res),
                _ = stop.cancelled() => None,
                _ = evict.cancelled() => None,
                _ = tokio::time::sleep(limits.max_connection_age) => None,
            };
            let result = match finished {
                Some(res) => res,
                // Let the request in flight (if any) complete, then close.
                None => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(limits.drain_grace, conn)
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(err) = result {
                debug!(%peer, %err, "endpoint connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    async fn server(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let handler: Handler = Arc::new(|_| text(StatusCode::OK, "ok\n"));
        tokio::spawn(serve_with(listener, handler, stop.clone(), limits));
        (addr, stop)
    }

    /// Reads until the server closes; `None` if it is still open after `within`.
    async fn closed_within(c: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut all = Vec::new();
        tokio::time::timeout(within, c.read_to_end(&mut all))
            .await
            .ok()
            .map(|_| all)
    }

    #[tokio::test]
    async fn a_silent_or_slow_client_is_cut_off_after_the_header_timeout() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop) = server(limits).await;
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        for c in [&mut silent, &mut slow] {
            let got = closed_within(c, Duration::from_secs(5)).await;
            assert!(got.is_some(), "still open after 5 s");
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_closes_after_its_maximum_age() {
        let limits = Limits {
            max_connection_age: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop) = server(limits).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let got = closed_within(&mut c, Duration::from_secs(5))
            .await
            .expect("closed after its age");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_past_the_limit_closes_the_oldest_connection_instead_of_waiting() {
        let limits = Limits {
            max_connections: 1,
            // Far beyond the test: only eviction can free the slot in time.
            header_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let (addr, stop) = server(limits).await;
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // An idle keep-alive connection holds the one slot.
        let mut oldest = TcpStream::connect(addr).await.expect("connect");
        oldest.write_all(request).await.expect("write");
        let mut head = [0u8; 12];
        oldest.read_exact(&mut head).await.expect("response");
        assert_eq!(&head, b"HTTP/1.1 200");
        // A new client (a kubelet probe) is served at once, and the oldest is closed.
        let mut probe = TcpStream::connect(addr).await.expect("connect");
        probe
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let got = closed_within(&mut probe, Duration::from_secs(5))
            .await
            .expect("the probe was answered");
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        assert!(
            closed_within(&mut oldest, Duration::from_secs(5))
                .await
                .is_some(),
            "the oldest connection was closed"
        );
        stop.cancel();
    }
}
