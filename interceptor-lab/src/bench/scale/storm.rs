//! Many concurrent intercepted connections, opened from the client pod, each carrying one
//! request through both sidecars so every hop is established, held while `at_peak` looks at
//! the maps, then closed. Bounded: every connect and request has a timeout, the whole storm a
//! deadline.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpStream, sync::Semaphore};

#[derive(Clone, Debug, Default, Serialize)]
pub struct StormResult {
    pub wanted: usize,
    /// Connections open (request answered) at the peak.
    pub open: usize,
    pub failed: usize,
    pub open_seconds: f64,
}

/// Opens `n` connections to `target` (at most `in_flight` handshakes at once), calls `at_peak`
/// with them all open, then closes them all.
pub fn run(target: SocketAddr, n: usize, in_flight: usize, at_peak: impl FnOnce()) -> StormResult {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => {
            return StormResult {
                wanted: n,
                failed: n,
                ..Default::default()
            };
        }
    };
    let started = Instant::now();
    let held = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(in_flight.max(1)));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await.ok()?;
                    tokio::time::timeout(Duration::from_secs(10), open(target))
                        .await
                        .ok()?
                })
            })
            .collect();
        let mut held = Vec::with_capacity(n);
        for t in tasks {
            held.push(t.await.ok().flatten());
        }
        held
    });
    let open_seconds = started.elapsed().as_secs_f64();
    let open = held.iter().filter(|h| h.is_some()).count();
    at_peak();
    // Closing: dropping the senders ends each connection task (hyper closes the socket).
    drop(held);
    // The connection tasks see their senders gone and close; then the runtime goes.
    rt.block_on(tokio::task::yield_now());
    drop(rt);
    StormResult {
        wanted: n,
        open,
        failed: n - open,
        open_seconds,
    }
}

/// An established connection with one answered request: the sender keeps it open.
async fn open(target: SocketAddr) -> Option<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(target).await.ok()?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("/bytes/64")
        .header(http::header::HOST, "server")
        .body(Empty::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.into_body().collect().await.ok()?;
    Some(sender)
}
