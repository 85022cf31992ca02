//! Memory per idle HTTP/2 connection: open N h2c client connections to a proxy, make one gRPC
//! call on each (so each is fully set up on both sides), leave them idle, and divide the proxy's
//! RSS growth by N.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, task::JoinHandle};

use super::procs::rss_kib;

/// A client connection kept open (its task ends when the sender is dropped).
pub struct Held {
    _sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An h2c connection to `target` that has made one gRPC call (`request`, a framed message)
/// and is left idle.
pub async fn idle_connection(target: SocketAddr, request: &Bytes) -> Result<Held> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .with_context(|| format!("h2c handshake with {target}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post("http://grpc/bench.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(request.clone()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("no answer within 10 s")??;
    if !resp.status().is_success() {
        bail!("{target} answered {}", resp.status());
    }
    resp.into_body().collect().await?;
    Ok(Held {
        _sender: sender,
        task,
    })
}

/// RSS growth of `pid` per idle h2 connection to `target`, bytes.
pub(super) async fn bytes_per_connection(
    target: SocketAddr,
    pid: u32,
    n: usize,
    request: &Bytes,
) -> Result<f64> {
    // Settle the allocator and the upstream pool first.
    let mut warm = Vec::new();
    for _ in 0..16 {
        warm.push(idle_connection(target, request).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(idle_connection(target, request).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    drop(held);
    drop(warm);
    Ok(after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64)
}
