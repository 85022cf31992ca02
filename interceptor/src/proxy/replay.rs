//! A request body kept while it is forwarded, so a retry can send it again (linkerd's
//! `http/retry/src/replay.rs` idea). gRPC requests carry no content-length, so a body cannot be
//! judged small before it is read; waiting for its end first would stall every streaming call.
//! Instead each attempt reads the chunks kept so far, then the client's body itself, keeping
//! what it reads up to a limit. Past the limit nothing more is kept and the body can no longer
//! be replayed: that attempt is the last.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Limited;
use hyper::body::{Body, Frame, SizeHint};

use super::h1::DownstreamBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Source = Limited<DownstreamBody>;

/// What every attempt of one request shares.
struct Shared {
    /// The client's body; `None` once it has ended.
    source: Option<Source>,
    /// Kept chunks; chunk `dropped + i` is `chunks[i]`.
    chunks: Vec<Bytes>,
    /// Chunks read but not kept (all of them, once the limit was passed).
    dropped: usize,
    kept_bytes: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    overflowed: bool,
    failed: bool,
    /// The newest attempt: an older one (still polled by its connection until its stream
    /// ends) must not read on from the client's body, or it could push the buffer past the
    /// limit under the attempt that replaced it.
    attempt: usize,
}

/// One attempt's view of the request body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The next chunk this attempt sends.
    next: usize,
    trailers_sent: bool,
    ended: bool,
    attempt: usize,
}

/// Hands out a body per attempt.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the request body was not kept for this attempt (past the retry buffer, the client's body \
     failed, or a retry replaced the attempt); raise `limits.retry_buffer_bytes` to retry \
     larger requests"
)]
struct NotKept;

impl Replay {
    pub fn new(source: Source, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                chunks: Vec::new(),
                dropped: 0,
                kept_bytes: 0,
                limit,
                trailers: None,
                overflowed: false,
                failed: false,
                attempt: 0,
            })),
        }
    }

    /// A body for the next attempt, starting from the first byte.
    pub fn attempt(&self) -> ReplayBody {
        let attempt = self
            .shared
            .lock()
            .map(|mut s| {
                s.attempt += 1;
                s.attempt
            })
            .unwrap_or(0);
        ReplayBody {
            shared: self.shared.clone(),
            next: 0,
            trailers_sent: false,
            ended: false,
            attempt,
        }
    }

    /// Whether another attempt would get the whole body.
    pub fn replayable(&self) -> bool {
        self.shared
            .lock()
            .map(|s| !s.overflowed && !s.failed)
            .unwrap_or(false)
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let Ok(mut shared) = this.shared.lock() else {
            return Poll::Ready(Some(Err(Box::new(NotKept))));
        };
        let shared = &mut *shared;
        if this.next < shared.dropped || this.attempt != shared.attempt {
            return Poll::Ready(Some(Err(Box::new(NotKept))));
        }
        if let Some(chunk) = shared.chunks.get(this.next - shared.dropped) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = shared.source.as_mut() else {
            if shared.failed {
                return Poll::Ready(Some(Err(Box::new(NotKept))));
            }
            if !this.trailers_sent
                && let Some(t) = &shared.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            this.ended = true;
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source = None;
                if !this.trailers_sent
                    && let Some(t) = &shared.trailers
                {
                    this.trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                }
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                shared.source = None;
                shared.failed = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.next += 1;
                    if !shared.overflowed && shared.kept_bytes + data.len() <= shared.limit {
                        shared.kept_bytes += data.len();
                        shared.chunks.push(data.clone());
                    } else {
                        // Past the limit: forward only, and free what was kept.
                        shared.overflowed = true;
                        shared.chunks = Vec::new();
                        shared.dropped = this.next;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    // Trailers end the body: the attempt that read them stops there (its
                    // sender never polls the source again), so the source is done with now —
                    // a later attempt replays the kept trailers instead of ending without
                    // them.
                    shared.trailers = Some(t.clone());
                    shared.source = None;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    /// Also true once this attempt has sent everything kept and the client's body says it has
    /// nothing more (an h2 request whose END_STREAM came with its data): the attempt's last
    /// DATA frame then carries END_STREAM, instead of an empty DATA frame after it.
    fn is_end_stream(&self) -> bool {
        if self.ended {
            return true;
        }
        let Ok(shared) = self.shared.lock() else {
            return false;
        };
        if self.attempt != shared.attempt
            || self.next < shared.dropped
            || self.next - shared.dropped < shared.chunks.len()
            || (!self.trailers_sent && shared.trailers.is_some())
        {
            return false;
        }
        match &shared.source {
            Some(source) => source.is_end_stream(),
            None => !shared.failed,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}
