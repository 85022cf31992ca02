//! Small real applications for the demo, the tests and the benchmark: an HTTP server that says
//! who called it, and a plain HTTP/1.1 client. They know nothing of interception.

use std::{
    convert::Infallible,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

pub mod grpc_echo;
pub mod h2_echo;
pub mod stream;
pub mod ws_echo;

/// Serves `GET /` with "hello from NAME: you are PEER calling LOCAL", and `GET /bytes/N` with N
/// bytes, until the process is stopped.
pub async fn http_server(listen: SocketAddr, name: String) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let name = Arc::new(name);
    println!(
        "testapp http-server listening on {}",
        listener.local_addr()?
    );
    loop {
        let (stream, peer) = listener.accept().await?;
        let local = stream.local_addr()?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(respond(&req, &name, peer, local)) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%err, "testapp connection");
            }
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    name: &str,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let body = if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0).min(64 << 20);
        Bytes::from(vec![b'x'; n])
    } else {
        Bytes::from(format!(
            "hello from {name}: you are {peer} calling {local}\n"
        ))
    };
    Response::new(Full::new(body))
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One `GET` on a fresh connection (`Connection: close`), blocking, with a timeout.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    http_get_host(addr, &addr.to_string(), path, timeout)
}

/// Like [`http_get`], with the `Host` header given (what a sidecar routes on).
pub fn http_get_host(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let mut content_length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = Vec::new();
    match content_length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(HttpResponse { status, body })
}
