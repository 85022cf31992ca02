//! Byte-exact TCP forwarding with half-close: when one side finishes sending, the other side's
//! write half is shut down and the opposite direction keeps flowing.

use std::io;

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};

use super::metrics::{Direction, ProxyMetrics};

/// Per-direction copy buffer: large enough that big transfers move in few syscalls (and few
/// sk_msg redirects), small enough for many idle connections.
const BUFFER: usize = 64 * 1024;

/// Forwards until both directions are done. Returns (downstream→upstream, upstream→downstream).
pub async fn forward(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    direction: Direction,
    metrics: &ProxyMetrics,
) -> io::Result<(u64, u64)> {
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let result =
        copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER, BUFFER).await;
    if let Ok((sent, received)) = result {
        metrics.add_bytes(direction, sent, received);
    }
    result
}
