//! A gRPC server (tonic's `server::Grpc` on hyper's HTTP/2 server, h2c prior knowledge) whose
//! every unary method echoes the request message: the upstream of the proxy benchmark's gRPC
//! rows.

use std::{convert::Infallible, future::Future, io, net::SocketAddr, pin::Pin};

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::debug;

use crate::grpc_codec::Raw;

/// Answers every call with its own message.
#[derive(Clone, Copy)]
struct Echo;

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let msg = request.into_inner();
        Box::pin(async move { Ok(tonic::Response::new(msg)) })
    }
}

/// Serves until the process ends.
pub async fn grpc_echo_server(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(tonic::server::Grpc::new(Raw).unary(Echo, req).await)
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(err) = served {
                debug!(%err, "gRPC connection ended");
            }
        });
    }
}
