//! A byte stream for the benchmark's app↔proxy hop: a writer that sends a fixed number of bytes
//! in messages of one size, and a sink that reads and discards them. The writer times the
//! whole delivery: its clock stops when the sink, having read everything, closes.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

/// Accepts connections and reads each to its end, discarding the bytes.
pub async fn sink(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("testapp sink listening on {}", listener.local_addr()?);
    loop {
        let (mut stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(err) => {
                        debug!(%peer, %err, "sink read");
                        break;
                    }
                }
            }
            debug!(%peer, total, "sink connection done");
        });
    }
}

/// What one stream run measured.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StreamResult {
    pub message_size: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub gib_per_second: f64,
    /// The time limit stopped the writer before its byte budget.
    pub hit_time_limit: bool,
}

/// Connects to `to`, writes `bytes` in `message_size` writes (stopping early at `time_limit`),
/// half-closes and waits for the sink's EOF.
pub async fn stream(
    to: SocketAddr,
    message_size: usize,
    bytes: u64,
    time_limit: Duration,
) -> io::Result<StreamResult> {
    let message = vec![0x5au8; message_size.max(1)];
    let mut conn = TcpStream::connect(to).await?;
    conn.set_nodelay(true)?;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut hit_time_limit = false;
    while sent < bytes {
        if started.elapsed() > time_limit {
            hit_time_limit = true;
            break;
        }
        let n = message.len().min((bytes - sent) as usize);
        conn.write_all(&message[..n]).await?;
        sent += n as u64;
    }
    conn.shutdown().await?;
    let mut rest = [0u8; 64];
    // The sink closes once it has read everything: that is the end of the delivery.
    let wait = time_limit.max(Duration::from_secs(5));
    match tokio::time::timeout(wait, conn.read(&mut rest)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(_)) => return Err(io::Error::other("the sink sent bytes back")),
        Ok(Err(err)) => return Err(err),
        Err(_) => return Err(io::Error::other("the sink did not finish reading in time")),
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(StreamResult {
        message_size,
        bytes: sent,
        seconds,
        gib_per_second: sent as f64 / seconds / f64::from(1u32 << 30),
        hit_time_limit,
    })
}
