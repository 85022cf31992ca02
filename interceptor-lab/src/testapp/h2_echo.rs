//! The gRPC echo of [`super::grpc_echo`] served on the `h2` crate directly (no hyper, no tonic):
//! a task per connection driving `h2::server::Connection`, a task per stream. The proxy
//! benchmark measures its memory per idle connection next to hyper's server: the floor of an
//! h2 server built on the h2 crate alone.

use std::{io, net::SocketAddr};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Serves until the process ends. `inline`: a connection's streams run on its own task
/// (polled beside the connection) instead of a task each.
pub async fn h2_echo_server(listen: SocketAddr, inline: bool) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let served = if inline {
                serve_inline(stream).await
            } else {
                serve(stream).await
            };
            if let Err(err) = served {
                debug!(%err, "h2 connection ended");
            }
        });
    }
}

async fn serve_inline(stream: TcpStream) -> Result<(), h2::Error> {
    use futures::{StreamExt as _, stream::FuturesUnordered};

    let mut conn = h2::server::handshake(stream).await?;
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => {
                let Some(accepted) = accepted else { return Ok(()) };
                let (req, respond) = accepted?;
                streams.push(echo(req, respond));
            }
            Some(done) = streams.next(), if !streams.is_empty() => {
                if let Err(err) = done {
                    debug!(%err, "h2 stream failed");
                }
            }
        }
    }
}

async fn serve(stream: TcpStream) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(stream).await?;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted?;
        tokio::spawn(async move {
            if let Err(err) = echo(req, respond).await {
                debug!(%err, "h2 stream failed");
            }
        });
    }
    Ok(())
}

/// Answers with the request's body (a gRPC message frame, sent back as it came) and
/// `grpc-status: 0`.
async fn echo(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let mut body = req.into_body();
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let response = Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .map_err(|_| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
    let mut send = respond.send_response(response, false)?;
    send.reserve_capacity(message.len());
    send.send_data(message.freeze(), false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    send.send_trailers(trailers)
}

/// The same echo on hyper's HTTP/2 server (no tonic): next to [`h2_echo_server`], what hyper's
/// server layer costs per call over the h2 crate's.
pub async fn hyper_echo_server(listen: SocketAddr) -> io::Result<()> {
    use http_body_util::{BodyExt as _, Full};
    use hyper::{body::Incoming, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: http::Request<Incoming>| async move {
                let message = req.into_body().collect().await?.to_bytes();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let body = Full::new(message)
                    .map_err(|never| match never {})
                    .with_trailers(async move { Some(Ok::<_, hyper::Error>(trailers)) });
                let mut resp = Response::new(body);
                resp.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, hyper::Error>(resp)
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(err) = served {
                debug!(%err, "hyper h2 connection ended");
            }
        });
    }
}
