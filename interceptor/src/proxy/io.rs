//! The downstream connection as the proxy reads it after detection: the bytes detection already
//! read are replayed first, and every byte in and out is counted (the `bytes` metric, recorded
//! when the connection is dropped however it ends).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
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
