//! The peer's side of an upstream h2c handshake, read off the socket as it arrives.
//!
//! A new h2 connection is shared only once the peer's stream limit is known, and that limit is
//! in the peer's first SETTINGS frame. hyper's client learns it inside a task of its own and
//! tells no one, so waiting on hyper costs a timeout on every new connection. Instead the
//! socket is wrapped: the first frame the peer sends (RFC 9113 §3.4: its preface, a SETTINGS
//! frame) is parsed as hyper reads it, and the outcome is published on a watch channel. After
//! that frame the wrapper only passes bytes through.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

/// What the peer has said so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Heard {
    /// Nothing yet.
    Waiting,
    /// Its preface, a SETTINGS frame; `None` = no SETTINGS_MAX_CONCURRENT_STREAMS (no limit).
    Settings { max_concurrent_streams: Option<u32> },
    /// Something else, or the connection ended first: the peer does not speak h2c.
    NotHttp2,
}

/// A socket whose first incoming h2 frame is reported on a watch channel.
#[derive(Debug)]
pub(super) struct HeardIo<T> {
    io: T,
    /// `None` once the first frame has been judged.
    parser: Option<Parser>,
    tx: watch::Sender<Heard>,
}

impl<T> HeardIo<T> {
    pub(super) fn new(io: T) -> (Self, watch::Receiver<Heard>) {
        let (tx, rx) = watch::channel(Heard::Waiting);
        let io = Self {
            io,
            parser: Some(Parser::default()),
            tx,
        };
        (io, rx)
    }
}

const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The first frame, fed in pieces as reads deliver it.
#[derive(Debug, Default)]
struct Parser {
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
    entry: [u8; 6],
    entry_len: usize,
    max_concurrent_streams: Option<u32>,
}

impl Parser {
    /// `Some` once the frame is judged.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<Heard> {
        if self.header_len < FRAME_HEADER {
            let n = (FRAME_HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < FRAME_HEADER {
                return None;
            }
            let h = self.header;
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if h[3] != SETTINGS || h[4] & ACK != 0 || stream != 0 || len % 6 != 0 {
                return Some(Heard::NotHttp2);
            }
            self.payload_left = len;
        }
        for &b in bytes.iter().take(self.payload_left) {
            self.entry[self.entry_len] = b;
            self.entry_len += 1;
            if self.entry_len == self.entry.len() {
                let e = self.entry;
                if u16::from_be_bytes([e[0], e[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS {
                    self.max_concurrent_streams =
                        Some(u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
                }
                self.entry_len = 0;
            }
        }
        self.payload_left -= bytes.len().min(self.payload_left);
        (self.payload_left == 0).then_some(Heard::Settings {
            max_concurrent_streams: self.max_concurrent_streams,
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeardIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(parser) = &mut this.parser {
            let judged = match &polled {
                Poll::Ready(Ok(())) => {
                    let new = &buf.filled()[before..];
                    if new.is_empty() {
                        // End of stream before the preface was complete.
                        room.then_some(Heard::NotHttp2)
                    } else {
                        parser.feed(new)
                    }
                }
                Poll::Ready(Err(_)) => Some(Heard::NotHttp2),
                Poll::Pending => None,
            };
            if let Some(heard) = judged {
                this.parser = None;
                this.tx.send_replace(heard);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeardIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    #[test]
    fn the_stream_limit_is_read_however_the_frame_is_split() {
        let frame = settings(&[(0x4, 65_535), (0x3, 2), (0x6, 16_384)]);
        for split in 0..frame.len() {
            let mut p = Parser::default();
            let first = p.feed(&frame[..split]);
            let heard = first.or_else(|| p.feed(&frame[split..]));
            assert_eq!(
                heard,
                Some(Heard::Settings {
                    max_concurrent_streams: Some(2)
                }),
                "split at {split}"
            );
        }
        let mut p = Parser::default();
        assert_eq!(
            p.feed(&settings(&[])),
            Some(Heard::Settings {
                max_concurrent_streams: None
            })
        );
    }

    #[test]
    fn an_http1_answer_is_not_http2() {
        let mut p = Parser::default();
        assert_eq!(
            p.feed(b"HTTP/1.1 400 Bad Request\r\n"),
            Some(Heard::NotHttp2)
        );
    }
}
