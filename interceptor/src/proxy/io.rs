//! The downstream connection as the proxy reads it after detection: the bytes detection already
//! read are replayed first, and every byte in and out is counted (the `bytes` metric, recorded
//! when the connection is dropped however it ends).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::{Direction, ProxyMetrics};

pub struct DownstreamIo<S> {
    prefix: BytesMut,
    inner: S,
    read: u64,
    written: u64,
    record: Option<(ProxyMetrics, Direction)>,
}

impl<S> DownstreamIo<S> {
    pub fn new(prefix: BytesMut, inner: S, metrics: ProxyMetrics, direction: Direction) -> Self {
        Self {
            prefix,
            inner,
            read: 0,
            written: 0,
            record: Some((metrics, direction)),
        }
    }
}

impl DownstreamIo<tokio::net::TcpStream> {
    /// Ready when a read would return something (replayed bytes, data, EOF or an error).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }
}

impl<S> DownstreamIo<S> {
    /// Whether bytes read earlier are waiting to be read again.
    pub fn has_unread(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// Puts bytes already read (and counted) back in front of the stream.
    pub fn unread(&mut self, bytes: Bytes) {
        self.read = self.read.saturating_sub(bytes.len() as u64);
        if self.prefix.is_empty() {
            self.prefix = BytesMut::from(bytes);
        } else {
            let mut prefix = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            prefix.extend_from_slice(&bytes);
            prefix.extend_from_slice(&self.prefix);
            self.prefix = prefix;
        }
    }
}

impl<S> Drop for DownstreamIo<S> {
    fn drop(&mut self) {
        if let Some((metrics, direction)) = self.record.take() {
            metrics.add_bytes(direction, self.read, self.written);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DownstreamIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Replayed: give the detection buffer back (idle connections stay small).
                this.prefix = BytesMut::new();
            }
            this.read += n as u64;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DownstreamIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &res {
            this.written += *n as u64;
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            this.written += *n as u64;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::metrics::{BytesLabels, Flow};

    #[tokio::test]
    async fn unread_bytes_are_read_again_and_counted_once() {
        let metrics = ProxyMetrics::default();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = DownstreamIo::new(
            BytesMut::from(&b"GET"[..]),
            server,
            metrics.clone(),
            Direction::Outbound,
        );
        client.write_all(b" / HTTP/1.1\r\n").await.expect("write");
        let mut first = vec![0; 16];
        let n = io.read(&mut first).await.expect("read");
        assert_eq!(&first[..n], b"GET");
        let n = io.read(&mut first).await.expect("read");
        assert_eq!(&first[..n], b" / HTTP/1.1\r\n");
        // Part of it goes back, as a stopped hyper hands back a partial head.
        io.unread(Bytes::from_static(b"HTTP/1.1\r\n"));
        assert!(io.has_unread());
        let mut again = vec![0; 16];
        let n = io.read(&mut again).await.expect("read");
        assert_eq!(&again[..n], b"HTTP/1.1\r\n");
        assert!(!io.has_unread());
        drop(io);
        let sent = metrics
            .bytes
            .get_or_create(&BytesLabels {
                direction: Direction::Outbound,
                flow: Flow::Sent,
            })
            .get();
        assert_eq!(sent, 16, "GET / HTTP/1.1\\r\\n, once");
    }
}
