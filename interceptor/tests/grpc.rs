//! gRPC through the proxy, with tonic as both the client and the server (no protoc here: the
//! messages are raw bytes through a hand-written `tonic::codec::Codec`, which is all tonic's
//! framing, status and metadata handling needs). The server is tonic's `server::Grpc` on hyper's
//! HTTP/2 server; the client is tonic's `client::Grpc` on hyper's HTTP/2 client connection to the
//! proxy (h2c prior knowledge, as a meshed app's gRPC client speaks).

#[path = "support/proxy.rs"]
mod support;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::stream;
use http::{Request, Response, StatusCode, uri::PathAndQuery};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use interceptor_lab::grpc_codec::Raw;
use support::{Proxy, refused_addr};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, Status, metadata::MetadataValue};

const MAX_MESSAGE: usize = 16 * 1024 * 1024;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MessageStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;

// === the server: tonic's server::Grpc on hyper's h2 server ===

/// Unary: echoes; `status:N:why` answers with that status (and `x-detail` metadata), `sleep:MS`
/// answers after that long.
#[derive(Clone)]
struct Unary;

impl tower_service::Service<tonic::Request<Bytes>> for Unary {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            if let Some(rest) = msg.strip_prefix(b"status:") {
                let text = String::from_utf8_lossy(rest).into_owned();
                let (code, why) = text.split_once(':').unwrap_or((&text, ""));
                let mut status =
                    Status::new(Code::from_i32(code.parse().unwrap_or(2)), why.to_owned());
                status
                    .metadata_mut()
                    .insert("x-detail", MetadataValue::from_static("from-the-server"));
                return Err(status);
            }
            if let Some(ms) = msg.strip_prefix(b"sleep:") {
                let ms: u64 = String::from_utf8_lossy(ms).parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut resp = tonic::Response::new(msg);
            resp.metadata_mut()
                .insert("x-served-by", MetadataValue::from_static("tonic"));
            Ok(resp)
        })
    }
}

/// Server streaming: the request says how many messages (`N`), each 1 KiB.
#[derive(Clone)]
struct Fanout;

impl tower_service::Service<tonic::Request<Bytes>> for Fanout {
    type Response = tonic::Response<MessageStream>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<MessageStream>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let n: usize = String::from_utf8_lossy(req.get_ref()).parse().unwrap_or(0);
            let s: MessageStream = Box::pin(stream::iter(
                (0..n).map(|i| Ok(Bytes::from(vec![(i % 256) as u8; 1024]))),
            ));
            Ok(tonic::Response::new(s))
        })
    }
}

/// Client streaming: answers with the total bytes received, as text.
#[derive(Clone)]
struct Sum;

impl tower_service::Service<tonic::Request<tonic::Streaming<Bytes>>> for Sum {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let mut s = req.into_inner();
            let mut total = 0usize;
            while let Some(m) = s.message().await? {
                total += m.len();
            }
            Ok(tonic::Response::new(Bytes::from(total.to_string())))
        })
    }
}

/// Bidi: echoes every message as it arrives.
#[derive(Clone)]
struct Echo;

impl tower_service::Service<tonic::Request<tonic::Streaming<Bytes>>> for Echo {
    type Response = tonic::Response<MessageStream>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<MessageStream>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let s: MessageStream = Box::pin(req.into_inner());
            Ok(tonic::Response::new(s))
        })
    }
}

/// Unary: answers UNAVAILABLE to the first call it gets, echoes every later one; counts calls.
#[derive(Clone)]
struct Flaky(Arc<AtomicUsize>);

impl tower_service::Service<tonic::Request<Bytes>> for Flaky {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let first = self.0.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            if first {
                return Err(Status::unavailable("warming up"));
            }
            Ok(tonic::Response::new(req.into_inner()))
        })
    }
}

struct GrpcServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Calls `/test.Echo/Flaky` received.
    flaky_calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn grpc<C: tonic::codec::Codec>(codec: C) -> tonic::server::Grpc<C> {
    tonic::server::Grpc::new(codec)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A gRPC server; `max_streams` is its SETTINGS_MAX_CONCURRENT_STREAMS.
async fn grpc_server(max_streams: Option<u32>) -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let flaky = Flaky(flaky_calls.clone());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let flaky = flaky.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let flaky = flaky.clone();
                    async move {
                        let resp = match req.uri().path() {
                            "/test.Echo/Unary" => grpc(Raw).unary(Unary, req).await,
                            "/test.Echo/Flaky" => grpc(Raw).unary(flaky, req).await,
                            "/test.Echo/Fanout" => grpc(Raw).server_streaming(Fanout, req).await,
                            "/test.Echo/Sum" => grpc(Raw).client_streaming(Sum, req).await,
                            "/test.Echo/Echo" => grpc(Raw).streaming(Echo, req).await,
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.max_concurrent_streams(max_streams);
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    GrpcServer {
        addr,
        accepted,
        flaky_calls,
        task,
    }
}

// === the client: tonic's client::Grpc on hyper's h2 client ===

#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<Request<tonic::body::Body>> for H2 {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<Result<Response<Incoming>, hyper::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let fut = self.0.send_request(req);
        Box::pin(fut)
    }
}

async fn client(addr: SocketAddr) -> tonic::client::Grpc<H2> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tonic::client::Grpc::with_origin(
        H2(sender),
        http::Uri::from_static("http://echo.test.svc:50051"),
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE)
}

async fn unary(
    c: &mut tonic::client::Grpc<H2>,
    msg: impl Into<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    unary_with(c, tonic::Request::new(msg.into())).await
}

async fn unary_with(
    c: &mut tonic::client::Grpc<H2>,
    req: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    tokio::time::timeout(
        Duration::from_secs(20),
        c.unary(req, PathAndQuery::from_static("/test.Echo/Unary"), Raw),
    )
    .await
    .expect("unary call in time")
}

// === tests ===

/// The issue's first row: no config at all, gRPC through the outbound passthrough and the
/// inbound listener; all four RPC kinds, and a message past tonic's 4 MiB default.
#[tokio::test]
async fn every_rpc_kind_passes_both_listeners_with_no_config() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    for (which, addr) in [("outbound", proxy.outbound), ("inbound", proxy.inbound)] {
        let mut c = client(addr).await;
        // Unary, 1 B and 5 MiB.
        let resp = unary(&mut c, Bytes::from_static(b"x")).await.expect(which);
        assert_eq!(resp.metadata().get("x-served-by").expect("header"), "tonic");
        assert_eq!(resp.into_inner(), Bytes::from_static(b"x"));
        let big = Bytes::from(
            (0..5 * 1024 * 1024)
                .map(|i| (i % 253) as u8)
                .collect::<Vec<_>>(),
        );
        let resp = unary(&mut c, big.clone()).await.expect(which);
        assert_eq!(resp.into_inner(), big, "{which}: 5 MiB message intact");

        // Server streaming: 200 × 1 KiB.
        c.ready().await.expect("ready");
        let resp = c
            .server_streaming(
                tonic::Request::new(Bytes::from_static(b"200")),
                PathAndQuery::from_static("/test.Echo/Fanout"),
                Raw,
            )
            .await
            .expect("server streaming");
        let mut s = resp.into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await.expect("message") {
            assert_eq!(m.len(), 1024);
            n += 1;
        }
        assert_eq!(n, 200, "{which}: every streamed message");

        // Client streaming: 100 messages of 10 KiB.
        c.ready().await.expect("ready");
        let msgs = stream::iter((0..100).map(|_| Bytes::from(vec![7u8; 10 * 1024])));
        let resp = c
            .client_streaming(
                tonic::Request::new(msgs),
                PathAndQuery::from_static("/test.Echo/Sum"),
                Raw,
            )
            .await
            .expect("client streaming");
        assert_eq!(
            resp.into_inner(),
            Bytes::from((100 * 10 * 1024).to_string())
        );

        // Bidi: each message is answered before the next is sent (nothing is buffered whole).
        c.ready().await.expect("ready");
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let outgoing = tokio_stream_from(rx);
        let resp = c.streaming(
            tonic::Request::new(outgoing),
            PathAndQuery::from_static("/test.Echo/Echo"),
            Raw,
        );
        tx.send(Bytes::from_static(b"ping 0")).await.expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("bidi head in time (the first message was not held back)")
            .expect("bidi");
        let mut incoming = resp.into_inner();
        for i in 0..20 {
            let got = tokio::time::timeout(Duration::from_secs(10), incoming.message())
                .await
                .expect("echo in time")
                .expect("message")
                .expect("not the end");
            assert_eq!(got, Bytes::from(format!("ping {i}")));
            tx.send(Bytes::from(format!("ping {}", i + 1)))
                .await
                .expect("send");
        }
        drop(tx);
        let _ = incoming.message().await;
    }
    assert!(
        proxy
            .metric("interceptor_proxy_grpc_requests_total{direction=\"Outbound\",cluster=\"PassthroughCluster\",grpc_status=\"0\"}")
            .await
            >= 5.0,
        "{}",
        proxy.prometheus().await
    );
    proxy.assert_no_open_connections().await;
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn status_message_and_trailing_metadata_pass_end_to_end() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    let mut c = client(proxy.outbound).await;
    let status = unary(&mut c, Bytes::from_static(b"status:5:no such thing"))
        .await
        .expect_err("NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(
        status.metadata().get("x-detail").expect("trailer"),
        "from-the-server"
    );
    assert!(
        proxy
            .metric("interceptor_proxy_grpc_requests_total{direction=\"Outbound\",cluster=\"PassthroughCluster\",grpc_status=\"5\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn upstream_down_is_unavailable_not_an_http_503() {
    let (down, _hold) = refused_addr();
    let proxy = Proxy::start("", down).await;
    let mut c = client(proxy.outbound).await;
    let status = unary(&mut c, Bytes::from_static(b"x"))
        .await
        .expect_err("UNAVAILABLE");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("connection failure"),
        "{status:?}"
    );
}

#[tokio::test]
async fn grpc_timeout_caps_the_route_timeout_and_answers_deadline_exceeded() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    let mut c = client(proxy.outbound).await;
    let mut req = tonic::Request::new(Bytes::from_static(b"sleep:10000"));
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = unary_with(&mut c, req)
        .await
        .expect_err("DEADLINE_EXCEEDED");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the proxy waited {:?} for a 300 ms deadline",
        started.elapsed()
    );
}

/// 16 concurrent calls on one client connection share one upstream connection; with a peer
/// that allows 2 streams, more connections are opened and every call still succeeds.
#[tokio::test]
async fn upstream_h2_is_multiplexed_within_the_peers_stream_limit() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    let c = client(proxy.outbound).await;
    let calls = (0..16).map(|_| {
        let mut c = c.clone();
        async move { unary(&mut c, Bytes::from_static(b"sleep:300")).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("call");
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "16 streams, one upstream connection"
    );

    let narrow = grpc_server(Some(2)).await;
    proxy.orig_dst.set(narrow.addr);
    let c = client(proxy.outbound).await;
    // A burst on a cold connection: held back until the peer's SETTINGS, never refused.
    let calls = (0..8).map(|_| {
        let mut c = c.clone();
        async move { unary(&mut c, Bytes::from_static(b"sleep:500")).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("call");
    }
    let opened = narrow.accepted.load(Ordering::SeqCst);
    assert!(
        opened >= 3,
        "a peer allowing 2 streams got {opened} connection(s) for 8 concurrent calls: \
         they queued behind its limit instead of opening connections"
    );
}

#[tokio::test]
async fn declared_grpc_port_sends_http1_clients_upstream_as_h2() {
    // An h2c-only upstream (hyper's HTTP/2 server, plain HTTP) behind a port the config names
    // as Istio would (`grpc-…` / `http2`): an HTTP/1.1 client still gets through.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = format!("h2 upstream saw {:?} {}", req.version(), req.uri());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    for listener in [
        format!("{{port: {}, name: http2-web}}", addr.port()),
        format!("{{port: {}, app_protocol: grpc}}", addr.port()),
    ] {
        let proxy = Proxy::start(&format!("outbound: {{listeners: [{listener}]}}"), addr).await;
        let body = support::http1_get(proxy.outbound, "/hello").await;
        assert!(
            body.starts_with("h2 upstream saw HTTP/2.0"),
            "{listener}: {body}"
        );
        assert!(body.contains("/hello"), "{body}");
    }
    // Without a declaration an HTTP/1.1 client is sent as HTTP/1.1 (auto), which an h2c-only
    // server cannot answer: a 503, not a hang.
    let proxy = Proxy::start("", addr).await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(
            Request::get("/")
                .header("host", "x")
                .body(Empty::<Bytes>::new())
                .expect("req"),
        ),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // And an h2c client reaches it with no config at all (hyper's h2 client).
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            Request::get("http://web.test/h2")
                .body(Empty::<Bytes>::new())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(body.starts_with(b"h2 upstream saw HTTP/2.0"), "{body:?}");
    task.abort();
}

#[tokio::test]
async fn grpc_requests_are_counted_by_status_under_bounded_labels() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    let mut c = client(proxy.outbound).await;
    for code in [0, 3, 14] {
        let msg = if code == 0 {
            Bytes::from_static(b"ok")
        } else {
            Bytes::from(format!("status:{code}:x"))
        };
        let _ = unary(&mut c, msg).await;
    }
    let text = proxy.prometheus().await;
    for code in ["0", "3", "14"] {
        assert!(
            text.contains(&format!("grpc_status=\"{code}\"")),
            "status {code} not counted:\n{text}"
        );
    }
}

/// A new upstream h2 connection is used as soon as the peer's SETTINGS arrive (a round trip),
/// not after a fixed wait: the first call to each of three fresh upstreams meets a 500 ms
/// deadline (before the fix each first call cost a full second). The deadline is the proxy's
/// own (`grpc-timeout`), so a miss is a DEADLINE_EXCEEDED answer, not a measurement.
#[tokio::test]
async fn the_first_call_on_a_new_upstream_connection_is_not_held_back() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start("", server.addr).await;
    for i in 0..3 {
        let fresh = grpc_server(None).await;
        // A client connection's original destination is fixed when it is accepted.
        proxy.orig_dst.set(fresh.addr);
        let mut c = client(proxy.outbound).await;
        let mut req = tonic::Request::new(Bytes::from(format!("first {i}")));
        req.set_timeout(Duration::from_millis(500));
        let resp = unary_with(&mut c, req)
            .await
            .unwrap_or_else(|s| panic!("first call to fresh upstream {i}: {s:?}"));
        assert_eq!(resp.into_inner(), Bytes::from(format!("first {i}")));
        assert_eq!(fresh.accepted.load(Ordering::SeqCst), 1);
    }
}

/// A peer that accepts the connection, reads the h2 preface and never answers: with `auto`
/// (no config) a gRPC client gets UNAVAILABLE once the connect timeout has passed, not a hang.
#[tokio::test]
async fn a_silent_upstream_is_unavailable_after_the_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..8 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut preface = [0u8; 24];
            let _ = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut preface).await;
            held.push(stream);
        }
    });
    let proxy = Proxy::start("outbound: {passthrough: {connect_timeout: 300ms}}", addr).await;
    let mut c = client(proxy.outbound).await;
    let status = unary(&mut c, Bytes::from_static(b"x"))
        .await
        .expect_err("UNAVAILABLE");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    silent.abort();
}

fn retry_config(endpoint: SocketAddr) -> String {
    format!(
        r#"
clusters:
  - name: echo
    endpoints: ["{endpoint}"]
    outlier_detection: {{consecutive_errors: 0}}
outbound:
  listeners:
    - port: 50051
      virtual_hosts:
        - name: echo
          domains: ["*"]
          routes:
            - route:
                cluster: echo
                retry_policy: {{retry_on: unavailable, num_retries: 2, base_interval: 1ms, max_interval: 1ms}}
"#
    )
}

/// gRPC requests carry no content-length: a small one, fully received, is still replayable,
/// so `retry_on: unavailable` retries it. One past the retry buffer is forwarded once, and a
/// bidi stream on the same route still flows message by message (nothing waits for the end
/// of the body).
#[tokio::test]
async fn a_small_grpc_request_without_content_length_is_retried() {
    let server = grpc_server(None).await;
    let proxy = Proxy::start(
        &retry_config(server.addr),
        "127.0.0.1:50051".parse().expect("addr"),
    )
    .await;
    let mut c = client(proxy.outbound).await;
    c.ready().await.expect("ready");
    let resp = c
        .unary(
            tonic::Request::new(Bytes::from_static(b"again")),
            PathAndQuery::from_static("/test.Echo/Flaky"),
            Raw,
        )
        .await
        .expect("retried past the first UNAVAILABLE");
    assert_eq!(resp.into_inner(), Bytes::from_static(b"again"));
    assert_eq!(server.flaky_calls.load(Ordering::SeqCst), 2, "two attempts");

    // 1 MiB: more than the retry buffer (64 KiB by default), so one attempt only.
    let big_server = grpc_server(None).await;
    let proxy = Proxy::start(
        &retry_config(big_server.addr),
        "127.0.0.1:50051".parse().expect("addr"),
    )
    .await;
    let mut c = client(proxy.outbound).await;
    c.ready().await.expect("ready");
    let status = c
        .unary(
            tonic::Request::new(Bytes::from(vec![1u8; 1024 * 1024])),
            PathAndQuery::from_static("/test.Echo/Flaky"),
            Raw,
        )
        .await
        .expect_err("not replayable: the first UNAVAILABLE is the answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(big_server.flaky_calls.load(Ordering::SeqCst), 1);

    c.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let resp = c.streaming(
        tonic::Request::new(tokio_stream_from(rx)),
        PathAndQuery::from_static("/test.Echo/Echo"),
        Raw,
    );
    tx.send(Bytes::from_static(b"ping 0")).await.expect("send");
    let mut incoming = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("bidi head in time (the first message was not held back)")
        .expect("bidi")
        .into_inner();
    for i in 0..5 {
        let got = tokio::time::timeout(Duration::from_secs(10), incoming.message())
            .await
            .expect("echo in time")
            .expect("message")
            .expect("not the end");
        assert_eq!(got, Bytes::from(format!("ping {i}")));
        tx.send(Bytes::from(format!("ping {}", i + 1)))
            .await
            .expect("send");
    }
}

/// Serves one h2c connection with the h2 crate's server: each request stream goes to `handle`
/// on a task of its own.
async fn serve_h2_streams<F, Fut>(stream: TcpStream, handle: F)
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(mut conn) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        tokio::spawn(handle(req, respond));
    }
}

/// An h2c upstream on a fresh port whose every connection is served by `serve_h2_streams`.
async fn h2_upstream<F, Fut>(handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_h2_streams(stream, handle.clone()));
        }
    });
    (addr, task)
}

/// An h2c upstream (the h2 crate's server) that answers every request with its headers and part
/// of the body, then resets the stream with CANCEL — the body cut short, never END_STREAM.
async fn cut_short_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    h2_upstream(|_req, mut respond| async move {
        let resp = Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .expect("response");
        let Ok(mut send) = respond.send_response(resp, false) else {
            return;
        };
        let _ = send.send_data(Bytes::from_static(b"part of the body"), false);
        tokio::time::sleep(Duration::from_millis(100)).await;
        send.send_reset(h2::Reason::CANCEL);
    })
    .await
}

async fn cut_short_proxy() -> (Proxy, tokio::task::JoinHandle<()>) {
    let (addr, task) = cut_short_upstream().await;
    let proxy = Proxy::start(
        &format!(
            "outbound: {{listeners: [{{port: {}, app_protocol: grpc}}]}}",
            addr.port()
        ),
        addr,
    )
    .await;
    (proxy, task)
}

#[tokio::test]
async fn an_upstream_reset_mid_body_is_cut_short_for_an_http1_client() {
    let (proxy, task) = cut_short_proxy().await;
    // HTTP/1.1 client (sent upstream as h2): a chunked body the proxy must cut off — the
    // connection closed without the final 0-chunk — not one that ends cleanly.
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /cut HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("request");
    let mut raw = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw),
    )
    .await
    .expect("the proxy closed the connection in time");
    let _ = read;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("part of the body"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a body the upstream reset was passed on as whole: {text}"
    );
    task.abort();
}

#[tokio::test]
async fn an_upstream_reset_mid_body_is_a_reset_for_an_h2_client() {
    let (proxy, task) = cut_short_proxy().await;
    // h2 client: the stream must fail (a reset), not end with END_STREAM.
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let (resp, _send) = client
        .send_request(
            Request::get("http://web.test/cut").body(()).expect("req"),
            true,
        )
        .expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("in time")
        .expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let failed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.data().await {
                Some(Ok(chunk)) => data.extend_from_slice(&chunk),
                Some(Err(err)) => break Some(err),
                None => break None,
            }
        }
    })
    .await
    .expect("the body ended or failed in time");
    assert_eq!(data, b"part of the body");
    let Some(err) = failed else {
        panic!(
            "a body the upstream reset ended with END_STREAM (trailers: {:?})",
            body.trailers().await
        );
    };
    assert!(err.is_reset() || err.is_io(), "{err:?}");
    task.abort();
}

/// Request trailers are part of the body a retry replays: an h2c upstream (the h2 crate's
/// server) answers the first attempt UNAVAILABLE once it has read the whole request, trailers
/// included, and the next attempt with the trailers it saw.
#[tokio::test]
async fn a_retry_replays_the_request_trailers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let (addr, task) = h2_upstream(move |req, mut respond| {
        let calls = counted.clone();
        async move {
            let mut body = req.into_body();
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let saw = match body.trailers().await {
                Ok(Some(t)) => t
                    .get("x-req-trailer")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("other")
                    .to_owned(),
                Ok(None) => "none".to_owned(),
                Err(_) => "error".to_owned(),
            };
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            let resp = Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", if first { "14" } else { "0" })
                .header("x-saw-trailers", saw)
                .header("x-saw-body", String::from_utf8_lossy(&data).into_owned())
                .body(())
                .expect("response");
            let _ = respond.send_response(resp, true);
        }
    })
    .await;
    let proxy = Proxy::start(
        &retry_config(addr),
        "127.0.0.1:50051".parse().expect("addr"),
    )
    .await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let (resp, mut send) = client
        .send_request(
            Request::post("http://echo.test/test.Echo/Trailers")
                .header("content-type", "application/grpc")
                .body(())
                .expect("req"),
            false,
        )
        .expect("send");
    send.send_data(Bytes::from_static(b"hello"), false)
        .expect("data");
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-req-trailer", http::HeaderValue::from_static("kept"));
    send.send_trailers(trailers).expect("trailers");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "two attempts");
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(resp.headers()["x-saw-body"], "hello");
    assert_eq!(
        resp.headers()["x-saw-trailers"],
        "kept",
        "the retry lost the request trailers"
    );
    task.abort();
}

/// A stream the upstream refuses with GOAWAY (its last stream id below the stream's) was never
/// processed: `retry_on: refused-stream` retries it, as it does REFUSED_STREAM. The endpoint's
/// first connection is raw bytes that answer the first HEADERS with GOAWAY(last stream 0) and
/// close; later ones are the h2 crate's server, answering 200.
#[tokio::test]
async fn a_stream_refused_by_goaway_is_retried_as_refused() {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    if !raw_h2_open(&mut stream).await {
                        return;
                    }
                    for _ in 0..64 {
                        let Some((head, _payload)) = raw_h2_frame(&mut stream).await else {
                            return;
                        };
                        if head[3] == 1 {
                            // HEADERS: GOAWAY, last stream id 0, NO_ERROR; then close.
                            let _ = stream
                                .write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                                .await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                    }
                });
                continue;
            }
            tokio::spawn(serve_h2_streams(stream, |_req, mut respond| async move {
                let resp = Response::builder().status(200).body(()).expect("response");
                let _ = respond.send_response(resp, true);
            }));
        }
    });
    let config = format!(
        r#"
clusters:
  - name: web
    endpoints: ["{addr}"]
    protocol: http2
outbound:
  listeners:
    - port: 50051
      virtual_hosts:
        - name: web
          domains: ["*"]
          routes:
            - route:
                cluster: web
                retry_policy: {{retry_on: refused-stream, num_retries: 1, base_interval: 1ms, max_interval: 1ms}}
"#
    );
    let proxy = Proxy::start(&config, "127.0.0.1:50051".parse().expect("addr")).await;
    let body = support::http1_get(proxy.outbound, "/refused").await;
    assert!(!body.contains("upstream connect error"), "{body}");
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/again")
                .header("host", "x")
                .body(Empty::<Bytes>::new())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    task.abort();
}

/// A client body past `max_request_body_bytes`, found only once its stream is open upstream
/// and its body streaming from a task of its own: a 413 for the client, as when it is found
/// earlier — not a 503 blaming the endpoint (which the outlier detector would count).
#[tokio::test]
async fn an_oversized_streaming_body_is_a_413_not_an_upstream_failure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An h2c upstream that reads the whole body before it answers.
    let (addr, task) = h2_upstream(|req, mut respond| async move {
        let mut body = req.into_body();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let resp = Response::builder().status(200).body(()).expect("response");
        let _ = respond.send_response(resp, true);
    })
    .await;
    let proxy = Proxy::start(
        &format!(
            "limits: {{max_request_body_bytes: 1000}}\noutbound: {{listeners: [{{port: {}, app_protocol: grpc}}]}}",
            addr.port()
        ),
        addr,
    )
    .await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(b"POST /big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .expect("head");
    let chunk = format!("1f4\r\n{}\r\n", "z".repeat(500));
    s.write_all(chunk.as_bytes()).await.expect("chunk");
    // The stream is open upstream and the body's pipe waits for more: its own task now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("in time")
        .expect("a response");
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    task.abort();
}

/// Upstream h2 PINGs are off unless `h2_upstream_keepalive_interval` asks for them (grpc-go
/// servers answer pings more often than every 5 minutes on a quiet stream with GOAWAY
/// `too_many_pings`); `h2_keepalive_interval` is for clients only. The upstream is raw bytes
/// that count PINGs (answering them) and never answer the request.
#[tokio::test]
async fn upstream_h2_pings_only_when_configured() {
    use tokio::io::AsyncWriteExt;
    for (limits, want_pings) in [
        ("h2_keepalive_interval: 1s, h2_keepalive_timeout: 3s", false),
        (
            "h2_upstream_keepalive_interval: 1s, h2_keepalive_timeout: 3s",
            true,
        ),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let pings = counted.clone();
                tokio::spawn(async move {
                    if !raw_h2_open(&mut stream).await {
                        return;
                    }
                    for _ in 0..1000 {
                        let Some((head, payload)) = raw_h2_frame(&mut stream).await else {
                            return;
                        };
                        if head[3] == 6 && head[4] & 1 == 0 {
                            pings.fetch_add(1, Ordering::SeqCst);
                            let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                            ack.extend_from_slice(&payload);
                            let _ = stream.write_all(&ack).await;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(
            &format!(
                "limits: {{{limits}}}\noutbound: {{listeners: [{{port: {}, app_protocol: grpc}}]}}",
                addr.port()
            ),
            addr,
        )
        .await;
        let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        // The stream waits on the upstream for 2.5 s (it never answers).
        let waited = tokio::time::timeout(
            Duration::from_millis(2500),
            sender.send_request(
                Request::get("/quiet")
                    .header("host", "x")
                    .body(Empty::<Bytes>::new())
                    .expect("req"),
            ),
        )
        .await;
        assert!(waited.is_err(), "{limits}: the upstream never answers");
        let seen = pings.load(Ordering::SeqCst);
        assert_eq!(seen > 0, want_pings, "{limits}: {seen} upstream PINGs");
        task.abort();
    }
}

/// A raw h2 server's side of the connection preface: reads the client's, sends an empty
/// SETTINGS and the ACK of the client's. False once the client is gone.
async fn raw_h2_open(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut preface = [0u8; 24];
    if stream.read_exact(&mut preface).await.is_err() {
        return false;
    }
    let _ = stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0])
        .await;
    true
}

/// The next frame a raw h2 server reads: its 9-byte head and its payload.
async fn raw_h2_frame(stream: &mut tokio::net::TcpStream) -> Option<([u8; 9], Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head, payload))
}
