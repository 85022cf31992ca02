//! The h2 crate's client, driven directly: a request's stream is opened, its body sent and its
//! response awaited from the request's own task.
//!
//! hyper's HTTP/2 client hands every request through a channel to the connection's task, which
//! spawns one more task per request to await the response and passes it back over a oneshot:
//! two extra task hops and allocations per call, about a fifth of the proxy's CPU per gRPC
//! call in a profile (`perf record` under h2load). Here the request body goes out from the
//! caller's task too when it is already complete (a unary call's message arrived with its
//! END_STREAM); only a body still streaming gets a task of its own.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use super::{super::cluster::UpstreamBody, StreamGuard};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body could not be sent.
#[derive(Debug)]
pub(super) enum PipeError {
    /// The client's body failed (cut short, or past a limit).
    Body(BoxError),
    /// The stream or connection failed.
    H2(h2::Error),
}

/// Sends a request body on its stream: each chunk once the stream has window for it (so a
/// slow upstream slows the client down), then trailers or an empty END_STREAM frame. The
/// same steps as hyper's `PipeToSendStream`.
pub(super) struct Pipe {
    body: UpstreamBody,
    send: h2::SendStream<Bytes>,
    /// A chunk read from the body, waiting for window.
    waiting: Option<(Bytes, bool)>,
    /// Where a spawned pipe leaves the client body's error for the request's task.
    report: Option<BodyFailure>,
    /// Counts the DATA frames sent: a spawned pipe's wait for window restarts when it moves.
    progress: u32,
}

/// What a spawned pipe shares with its request's task, in one allocation.
#[derive(Debug)]
pub(super) struct PipeShared {
    /// The client body's error, if it failed in the pipe: the request's task, which sees only
    /// the stream reset that followed, answers with it (413 past the size limit) and does not
    /// blame the endpoint.
    failure: Mutex<Option<BoxError>>,
    /// The stream's place in its connection's count, kept until the pipe has ended and the
    /// response is done with (h2 counts the stream open until both sides end).
    _stream: StreamGuard,
}

type BodyFailure = Arc<PipeShared>;

impl Pipe {
    pub(super) fn new(body: UpstreamBody, send: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            send,
            waiting: None,
            report: None,
            progress: 0,
        }
    }

    fn h2_err(&mut self, err: h2::Error) -> PipeError {
        PipeError::H2(err)
    }
}

impl Future for Pipe {
    type Output = Result<(), PipeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            // Woken if the peer resets the stream while the body is waited for.
            if let Poll::Ready(reset) = this.send.poll_reset(cx) {
                let err = match reset {
                    Ok(reason) => h2::Error::from(reason),
                    Err(err) => err,
                };
                return Poll::Ready(Err(this.h2_err(err)));
            }
            if let Some((mut data, eos)) = this.waiting.take() {
                while this.send.capacity() == 0 {
                    match this.send.poll_capacity(cx) {
                        Poll::Pending => {
                            this.waiting = Some((data, eos));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(this.h2_err(err))),
                        Poll::Ready(None) => {
                            // The stream closed under the body: the upstream's doing.
                            return Poll::Ready(Err(PipeError::H2(h2::Error::from(
                                h2::Reason::CANCEL,
                            ))));
                        }
                    }
                }
                // No more than the window assigned: h2 would queue the rest and count the
                // stream open while it holds it, long after this pipe (and the pool's count
                // of the stream) ended, if the peer never gives window back.
                let capacity = this.send.capacity();
                let rest = if data.len() > capacity {
                    let piece = data.split_to(capacity);
                    Some(std::mem::replace(&mut data, piece))
                } else {
                    None
                };
                let last = eos && rest.is_none();
                if let Err(err) = this.send.send_data(data, last) {
                    return Poll::Ready(Err(this.h2_err(err)));
                }
                this.progress = this.progress.wrapping_add(1);
                if let Some(rest) = rest {
                    this.send.reserve_capacity(rest.len());
                    this.waiting = Some((rest, eos));
                } else if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        if data.is_empty() {
                            if let Err(err) = this.send.send_data(data, eos) {
                                return Poll::Ready(Err(this.h2_err(err)));
                            }
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // Claimed once a chunk is in hand, so a body that never sends pins no
                        // window (hyper #4003); sent as window comes, never queued past it.
                        this.send.reserve_capacity(data.len());
                        this.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.send.reserve_capacity(0);
                            return Poll::Ready(
                                this.send
                                    .send_trailers(trailers)
                                    .map_err(|e| this.h2_err(e)),
                            );
                        }
                    }
                },
                Poll::Ready(Some(Err(err))) => {
                    // Reported before the reset, so the request's task finds it when the reset
                    // wakes it.
                    let err = match &this.report {
                        Some(shared) => {
                            if let Ok(mut slot) = shared.failure.lock() {
                                *slot = Some(err);
                            }
                            "the client's request body failed".into()
                        }
                        None => err,
                    };
                    this.send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(PipeError::Body(err)));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(
                        this.send
                            .send_data(Bytes::new(), true)
                            .map_err(|e| this.h2_err(e)),
                    );
                }
            }
        }
    }
}

/// A body still streaming when its request went out: its own task, which resets the stream
/// if the caller gives up on the response before it comes (`cancel` dropped unsent is not
/// giving up: that is what happens once the response is in). The stream stays counted until
/// the task has ended and the [`Cancel::disarm`]ed share is dropped.
///
/// Once the response has ended, a pipe that has waited for window longer than the pool's idle
/// timeout (`stall_limit`) with no DATA frame sent resets its stream (CANCEL): the upstream
/// answered and may never read the rest, and a stream counted for good would keep its
/// connection from ever closing as idle, even after a reload. (The client's body is not read
/// while the window is waited for, so a client gone meanwhile goes unseen until then.)
pub(super) fn spawn_pipe(mut pipe: Pipe, stream: StreamGuard) -> Cancel {
    let stall_limit = stream.0.idle_timeout;
    let shared = Arc::new(PipeShared {
        failure: Mutex::new(None),
        _stream: stream,
    });
    pipe.report = Some(shared.clone());
    let (tx, mut rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::pin!(pipe);
        // Created when first armed: most pipes never wait for window after their response.
        let mut stall = std::pin::pin!(None::<tokio::time::Sleep>);
        // The pipe's progress when the stall timer was last set, while it is set.
        let mut armed: Option<u32> = None;
        let mut watching = true;
        let done = std::future::poll_fn(|cx| {
            if watching {
                match Pin::new(&mut rx).poll(cx) {
                    Poll::Ready(Ok(())) => {
                        pipe.send.send_reset(h2::Reason::CANCEL);
                        return Poll::Ready(());
                    }
                    Poll::Ready(Err(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(r) = pipe.as_mut().poll(cx) {
                if let Err(err) = r {
                    tracing::debug!(?err, "upstream request body ended early");
                }
                return Poll::Ready(());
            }
            if watching || pipe.waiting.is_none() || stall_limit.is_zero() {
                armed = None;
                return Poll::Pending;
            }
            if armed != Some(pipe.progress) {
                armed = Some(pipe.progress);
                let at = tokio::time::Instant::now() + stall_limit;
                match stall.as_mut().as_pin_mut() {
                    Some(timer) => timer.reset(at),
                    None => stall.set(Some(tokio::time::sleep_until(at))),
                }
            }
            while let Some(mut timer) = stall.as_mut().as_pin_mut()
                && timer.as_mut().poll(cx).is_ready()
            {
                // The response is still being read (its body holds the other share): the
                // upstream may yet give window as it goes on.
                if pipe
                    .report
                    .as_ref()
                    .is_some_and(|r| Arc::strong_count(r) > 1)
                {
                    timer.reset(tokio::time::Instant::now() + stall_limit);
                    continue;
                }
                tracing::debug!(
                    ?stall_limit,
                    "upstream gave no window for the rest of a request body after its response; \
                     resetting the stream"
                );
                pipe.send.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
            Poll::Pending
        });
        done.await;
    });
    Cancel(Some(tx), shared)
}

/// Resets a spawned body's stream when dropped, unless [`Cancel::disarm`]ed.
pub(super) struct Cancel(Option<oneshot::Sender<()>>, BodyFailure);

impl Cancel {
    /// The response is in: the pipe goes on, and the returned share keeps the stream counted.
    pub(super) fn disarm(mut self) -> Arc<PipeShared> {
        self.0.take();
        self.1.clone()
    }

    /// The client body's error, if that is why the spawned pipe ended.
    pub(super) fn body_failure(&self) -> Option<BoxError> {
        self.1.failure.lock().ok()?.take()
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A `content-length` for a body whose size is known, as hyper's client sets it. (The
/// connection-specific headers h2 refuses are gone already: `prepare_request_headers` strips
/// them from every proxied request.)
pub(super) fn set_content_length(headers: &mut HeaderMap, method: &Method, body: &UpstreamBody) {
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || has_payload_semantics(method))
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// An upstream h2 response body: data (its window given back as it is read), then trailers.
pub(super) struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    pub(super) fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(ended_or_failed(err)),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(err)) => Poll::Ready(ended_or_failed(err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A reset that arrives after the upstream's END_STREAM is absorbed by h2 itself
/// (`ErrorAfterEndStream`), so any reset seen here cut the body short — NO_ERROR and CANCEL
/// included (a tonic or hyper handler dropped mid-stream sends CANCEL). Passed on as an
/// error, never as a clean end: the client must not take a truncated body for a whole one.
fn ended_or_failed(err: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    Some(Err(err))
}
