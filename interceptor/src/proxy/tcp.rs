//! TCP passthrough for everything that is not HTTP: byte-exact, with half-close (when one side
//! finishes sending, the other side's write half is shut down and the opposite direction keeps
//! flowing).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};
use tracing::debug;

use super::{
    cluster,
    metrics::{Direction, ProxyMetrics, Refusal},
};

/// Per-direction copy buffer: large enough that big transfers move in few syscalls (and few
/// sk_msg redirects), small enough for many idle connections.
const BUFFER: usize = 64 * 1024;

/// Connects to `dst` (from `source` when given) and forwards until both directions are done.
pub async fn proxy<S>(
    mut downstream: S,
    dst: SocketAddr,
    source: Option<IpAddr>,
    connect_timeout: Duration,
    direction: Direction,
    metrics: &ProxyMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connected = tokio::time::timeout(connect_timeout, cluster::connect(source, dst)).await;
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => {
            debug!(%dst, %err, "upstream connect failed; closing the client connection");
            metrics.refuse(direction, Refusal::ConnectFailed);
            return;
        }
        Err(_) => {
            debug!(%dst, ?connect_timeout, "upstream connect timed out; closing the client connection");
            metrics.refuse(direction, Refusal::ConnectFailed);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match forward(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => debug!(%dst, sent, received, "tcp closed"),
        Err(err) => debug!(%dst, %err, "tcp ended with an error"),
    }
}

/// Forwards until both directions are done. Returns (downstream→upstream, upstream→downstream).
pub async fn forward<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await
}
