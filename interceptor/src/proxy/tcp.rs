//! TCP passthrough for everything that is not HTTP: byte-exact, with half-close (when one side
//! finishes sending, the other side's write half is shut down and the opposite direction keeps
//! flowing), and an idle timeout (no byte either way for that long closes both sides).
//!
//! Copy buffers exist only while bytes are in flight: a direction reads its first bytes into a
//! small stack buffer, takes a 64 KiB heap buffer only then, and gives it back as soon as
//! everything read was written and the socket has nothing more. An idle proxied connection (a
//! database pool's, a long-poll's) holds no buffer at all, instead of 2 × 64 KiB from the start.

use std::{
    future::poll_fn,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tracing::debug;

use super::{
    cluster,
    metrics::{Direction, ProxyMetrics, Refusal},
};

/// Per-direction copy buffer while data flows: large enough that big transfers move in few
/// syscalls (and few sk_msg redirects).
const BUFFER: usize = 64 * 1024;

/// What an idle direction reads its first bytes into (on the stack, per poll).
const FIRST_READ: usize = 4 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// No byte either way for this long closes the connection; `None` = never.
    pub idle: Option<Duration>,
}

/// Connects to `dst` (from `source` when given) and forwards until both directions are done.
pub async fn proxy<S>(
    mut downstream: S,
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeouts: Timeouts,
    direction: Direction,
    metrics: &ProxyMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect_timeout = timeouts.connect;
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
    match forward_with_idle(&mut downstream, &mut upstream, timeouts.idle).await {
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
    forward_with_idle(a, b, None).await
}

/// `forward`, ending with `TimedOut` when no byte moved either way for `idle`.
pub async fn forward_with_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    let mut last_moved = Instant::now();
    let timer = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(timer);
    poll_fn(|cx| {
        let before = a_to_b.moved + b_to_a.moved;
        let ab = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let ba = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        if ab.is_ready() && ba.is_ready() {
            return Poll::Ready(Ok((a_to_b.moved, b_to_a.moved)));
        }
        if let Some(idle) = idle {
            let now = Instant::now();
            if a_to_b.moved + b_to_a.moved != before {
                last_moved = now;
            }
            while timer.as_mut().poll(cx).is_ready() {
                if now.duration_since(last_moved) >= idle {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bytes either way for {idle:?} (tcp_idle_timeout)"),
                    )));
                }
                timer.as_mut().reset(last_moved + idle);
            }
        }
        Poll::Pending
    })
    .await
}

/// One direction of the copy.
#[derive(Default)]
struct Half {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    read_done: bool,
    done: bool,
    moved: u64,
}

impl Half {
    /// Ready once the reader hit EOF, everything was written and the writer shut down.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos < self.cap {
                let Some(buf) = self.buf.as_deref() else {
                    return Poll::Ready(Err(io::Error::other("copy buffer lost")));
                };
                let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                continue;
            }
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            let read = match self.buf.as_deref_mut() {
                Some(buf) => {
                    let mut rb = ReadBuf::new(buf);
                    match reader.as_mut().poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => Ok(rb.filled().len()),
                        Poll::Ready(Err(e)) => Err(e),
                        Poll::Pending => {
                            // Drained and nothing more to read: give the buffer back.
                            self.buf = None;
                            ready!(writer.as_mut().poll_flush(cx))?;
                            return Poll::Pending;
                        }
                    }
                }
                None => {
                    let mut first = [0u8; FIRST_READ];
                    let mut rb = ReadBuf::new(&mut first);
                    match reader.as_mut().poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if n > 0 {
                                let mut buf = vec![0u8; BUFFER].into_boxed_slice();
                                buf[..n].copy_from_slice(rb.filled());
                                self.buf = Some(buf);
                            }
                            Ok(n)
                        }
                        Poll::Ready(Err(e)) => Err(e),
                        Poll::Pending => {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            return Poll::Pending;
                        }
                    }
                }
            };
            let n = read?;
            if n == 0 {
                self.read_done = true;
            } else {
                self.cap = n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_pass_both_ways_with_half_close_and_buffers_go_when_drained() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move { forward(&mut a, &mut b).await });
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, data, "byte-exact after the client's half-close");
        server
            .write_all(b"reply after half-close")
            .await
            .expect("reply");
        server.shutdown().await.expect("close");
        let back = writer.await.expect("join");
        assert_eq!(back, b"reply after half-close");
        let (ab, ba) = copy.await.expect("join").expect("copy");
        assert_eq!((ab, ba), (200_000, 22));
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (_client, a) = tokio::io::duplex(64);
        let mut half = Half::default();
        let (_sink_peer, sink) = tokio::io::duplex(64);
        let (mut a, mut sink) = (a, sink);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            half.poll(&mut cx, Pin::new(&mut a), Pin::new(&mut sink))
                .is_pending()
        );
        assert!(half.buf.is_none(), "nothing to read: no buffer taken");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_end_after_the_idle_timeout() {
        let (_client, mut a) = tokio::io::duplex(64);
        let (mut b, _server) = tokio::io::duplex(64);
        let err = forward_with_idle(&mut a, &mut b, Some(Duration::from_secs(3600)))
            .await
            .expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
