//! gRPC and WebSocket between two pods through both sidecars, with no proxy config at all
//! (passthrough outbound, the pod's own port inbound), in eBPF and iptables modes. Peers:
//! tonic (client and server, bytes codec: no protoc here) and tokio-tungstenite. The sockets
//! are made inside the pods' network namespaces, so the real interception applies to them.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream};
use http::{Request, Response, uri::PathAndQuery};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use interceptor_lab::grpc_codec::Raw;
use tokio_tungstenite::tungstenite::Message;
use tonic::{Code, Status};

use crate::{Harness, LabPod, ip4};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Messages = Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;
const MAX: usize = 16 * 1024 * 1024;

/// Unary echo; `fail` answers FAILED_PRECONDITION with trailing metadata.
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
            if msg.as_ref() == b"fail" {
                let mut s = Status::failed_precondition("as asked");
                s.metadata_mut().insert(
                    "x-why",
                    tonic::metadata::MetadataValue::from_static("trailer"),
                );
                return Err(s);
            }
            Ok(tonic::Response::new(msg))
        })
    }
}

/// Bidi echo.
#[derive(Clone)]
struct Echo;

impl tower_service::Service<tonic::Request<tonic::Streaming<Bytes>>> for Echo {
    type Response = tonic::Response<Messages>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<Messages>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let s: Messages = Box::pin(req.into_inner());
            Ok(tonic::Response::new(s))
        })
    }
}

fn grpc() -> tonic::server::Grpc<Raw> {
    tonic::server::Grpc::new(Raw)
        .max_decoding_message_size(MAX)
        .max_encoding_message_size(MAX)
}

/// Serves gRPC (tonic on hyper's h2 server) on a listener made in the server pod, recording
/// each connection's peer address.
async fn serve_grpc(listener: std::net::TcpListener, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    while let Ok((stream, peer)) = listener.accept().await {
        peers.lock().expect("lock").push(peer);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let resp = match req.uri().path() {
                    "/t.E/Unary" => grpc().unary(Unary, req).await,
                    "/t.E/Echo" => grpc().streaming(Echo, req).await,
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn serve_ws(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let _ = interceptor_lab::testapp::ws_echo::serve(listener).await;
}

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
        Box::pin(self.0.send_request(req))
    }
}

/// A TCP connection made from inside `pod` (so its interception applies), for tokio.
fn dial(pod: &LabPod, addr: SocketAddr) -> tokio::net::TcpStream {
    let std = pod
        .run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .expect("netns")
        .unwrap_or_else(|e| panic!("connect {addr} from {}: {e}", pod.name));
    std.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(std).expect("tokio stream")
}

async fn grpc_client(stream: tokio::net::TcpStream) -> tonic::client::Grpc<H2> {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    tonic::client::Grpc::with_origin(H2(sender), http::Uri::from_static("http://echo.test"))
        .max_decoding_message_size(MAX)
        .max_encoding_message_size(MAX)
}

async fn unary(c: &mut tonic::client::Grpc<H2>, msg: Bytes) -> Result<Bytes, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    tokio::time::timeout(
        Duration::from_secs(20),
        c.unary(
            tonic::Request::new(msg),
            PathAndQuery::from_static("/t.E/Unary"),
            Raw,
        ),
    )
    .await
    .expect("in time")
    .map(tonic::Response::into_inner)
}

fn through_both_sidecars(tag: &str, mode: &[&str]) {
    let mut h = Harness::new(tag);
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    h.sidecar(&server);
    let grpc_addr = SocketAddr::new(ip4(&server), 50051);
    let ws_addr = SocketAddr::new(ip4(&server), 8080);
    let nothing = SocketAddr::new(ip4(&server), 50052);
    let listen = |addr| {
        server
            .run(move || std::net::TcpListener::bind(addr))
            .expect("netns")
            .expect("bind in the server pod")
    };
    let (grpc_listener, ws_listener) = (listen(grpc_addr), listen(ws_addr));
    for l in [&grpc_listener, &ws_listener] {
        l.set_nonblocking(true).expect("nonblocking");
    }
    h.enable(&client, mode);
    h.enable(&server, mode);
    if mode.is_empty() {
        h.wait_inbound_ready(&server);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let servers = [
        rt.spawn(serve_grpc(grpc_listener, peers.clone())),
        rt.spawn(serve_ws(ws_listener)),
    ];
    let _runtime = rt.enter();
    // Each connection is dialed right before its first bytes: a connection left silent past the
    // sidecar's protocol-detection timeout (5 s, easily reached in a TCG guest) is proxied as
    // plain TCP, as Istio's sniffing does, and then h2 on it meets a closed upstream.
    rt.block_on(async {
        let mut c = grpc_client(dial(&client, grpc_addr)).await;
        assert_eq!(
            unary(&mut c, Bytes::from_static(b"hi"))
                .await
                .expect("unary"),
            Bytes::from_static(b"hi")
        );
        let big = Bytes::from(
            (0..5 * 1024 * 1024)
                .map(|i| (i % 241) as u8)
                .collect::<Vec<_>>(),
        );
        assert_eq!(unary(&mut c, big.clone()).await.expect("5 MiB"), big);
        let status = unary(&mut c, Bytes::from_static(b"fail"))
            .await
            .expect_err("status");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(status.metadata().get("x-why").expect("trailer"), "trailer");
        // Bidi: 10 echoes.
        c.ready().await.expect("ready");
        let msgs = stream::iter((0..10).map(|i| Bytes::from(format!("m{i}"))));
        let resp = c
            .streaming(
                tonic::Request::new(msgs),
                PathAndQuery::from_static("/t.E/Echo"),
                Raw,
            )
            .await
            .expect("bidi");
        let mut s = resp.into_inner();
        for i in 0..10 {
            let m = s.message().await.expect("message").expect("more");
            assert_eq!(m, Bytes::from(format!("m{i}")));
        }
        // Nothing listens on 50052: the server's sidecar answers UNAVAILABLE.
        let mut down = grpc_client(dial(&client, nothing)).await;
        let status = unary(&mut down, Bytes::from_static(b"x"))
            .await
            .expect_err("unavailable");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");

        // WebSocket: text, 1 MiB binary, close.
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://{ws_addr}/"), dial(&client, ws_addr))
                .await
                .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("hello")).await.expect("send");
        assert_eq!(
            ws.next().await.expect("msg").expect("msg"),
            Message::text("hello")
        );
        let blob: Vec<u8> = (0..1024 * 1024).map(|i| (i % 239) as u8).collect();
        ws.send(Message::binary(blob.clone())).await.expect("send");
        assert_eq!(
            ws.next().await.expect("msg").expect("msg"),
            Message::binary(blob)
        );
        ws.close(None).await.expect("close");
    });
    // The app saw the server sidecar (Istio's inbound passthrough source), never the client.
    for peer in peers.lock().expect("lock").iter() {
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)), "{peer}");
    }
    let grpc_ok = |pod: &LabPod, direction: &str, cluster: &str| {
        h.proxy_metric(
            pod,
            &format!(
                "interceptor_proxy_grpc_requests_total{{direction=\"{direction}\",cluster=\"{cluster}\",grpc_status=\"0\"}}"
            ),
        )
    };
    assert!(grpc_ok(&client, "Outbound", "PassthroughCluster") >= 3.0);
    assert!(grpc_ok(&server, "Inbound", "inbound|50051||") >= 3.0);
    for s in servers {
        s.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(2));
}

#[test]
fn grpc_and_websocket_through_both_sidecars_ebpf() {
    through_both_sidecars("protoebpf", &[]);
}

#[test]
fn grpc_and_websocket_through_both_sidecars_iptables() {
    through_both_sidecars("protoipt", &["--mode", "iptables", "--backend", "nft"]);
}
