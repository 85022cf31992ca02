//! WebSocket (HTTP/1.1 `Upgrade`) through the proxy, with tokio-tungstenite as the client and
//! the server: routed like any request, joined as a byte stream after 101, both directions.

#[path = "support/proxy.rs"]
mod support;

use std::{net::SocketAddr, time::Duration};

use futures::{SinkExt, StreamExt};
use support::Proxy;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::{
    WebSocketStream, client_async,
    tungstenite::{Message, protocol::CloseFrame, protocol::frame::coding::CloseCode},
};

/// The lab's tokio-tungstenite echo server: text and binary echoed, pings answered by the
/// library, a close answered with a close.
async fn ws_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = interceptor_lab::testapp::ws_echo::serve(listener).await;
    });
    (addr, task)
}

async fn connect(addr: SocketAddr, host: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        client_async(format!("ws://{host}/chat"), stream),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

async fn next(ws: &mut WebSocketStream<TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("message in time")
        .expect("not the end")
        .expect("message")
}

#[tokio::test]
async fn text_binary_ping_and_close_pass_both_listeners() {
    let (server, task) = ws_echo().await;
    let proxy = Proxy::start("", server).await;
    for addr in [proxy.outbound, proxy.inbound] {
        let mut ws = connect(addr, "chat.test").await;
        ws.send(Message::text("hello")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("hello"));
        let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 249) as u8).collect();
        ws.send(Message::binary(big.clone())).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::binary(big));
        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .expect("ping");
        assert_eq!(
            next(&mut ws).await,
            Message::Pong(b"are you there".to_vec().into())
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .expect("close");
        // The server's close answer comes back, then the stream ends.
        let mut saw_close = false;
        while let Some(Ok(msg)) = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close handshake in time")
        {
            saw_close |= matches!(msg, Message::Close(_));
        }
        assert!(saw_close, "the close handshake completed through the proxy");
    }
    proxy.assert_no_open_connections().await;
    task.abort();
}

#[tokio::test]
async fn routed_upgrades_follow_the_route_and_its_upgrade_list() {
    let (server, task) = ws_echo().await;
    let port = server.port();
    let yaml = format!(
        r#"
clusters:
  - {{name: chat, endpoints: ["{server}"]}}
outbound:
  listeners:
    - port: {port}
      virtual_hosts:
        - name: chat
          domains: [chat.test]
          routes:
            - {{match: {{prefix: /chat}}, route: {{cluster: chat}}}}
        - name: closed
          domains: [closed.test]
          routes:
            - {{route: {{cluster: chat, upgrades: []}}}}
"#
    );
    let proxy = Proxy::start(&yaml, server).await;
    let mut ws = connect(proxy.outbound, "chat.test").await;
    ws.send(Message::text("routed")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("routed"));
    drop(ws);
    // A route that does not allow upgrades answers 403, and says why.
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let err = client_async("ws://closed.test/chat", stream)
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    task.abort();
}

/// An upstream that refuses the upgrade: its answer reaches the client; the proxy stays up.
#[tokio::test]
async fn an_upgrade_the_upstream_refuses_gets_its_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 8\r\n\r\nnot here",
                    )
                    .await;
            });
        }
    });
    let proxy = Proxy::start("", addr).await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let err = client_async("ws://x.test/", stream)
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 426),
        other => panic!("expected the upstream's 426, got {other:?}"),
    }
    proxy.assert_no_open_connections().await;
    task.abort();
}

/// The upstream vanishes mid-stream: the client sees its connection end (no hang), and the
/// proxy holds nothing afterwards.
#[tokio::test]
async fn an_upstream_that_vanishes_mid_stream_ends_the_client_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                // One echo, then the process "dies": the socket is dropped without a close.
                if let Some(Ok(msg)) = ws.next().await {
                    let _ = ws.send(msg).await;
                }
                drop(ws);
            });
        }
    });
    let proxy = Proxy::start("", addr).await;
    let mut ws = connect(proxy.outbound, "x.test").await;
    ws.send(Message::text("one")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("one"));
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the end reached the client in time");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    drop(ws);
    proxy.assert_no_open_connections().await;
    task.abort();
}

/// Half-close after an upgrade: the client finishes sending, and the upstream's answer still
/// flows back (raw bytes after the 101, both ways).
#[tokio::test]
async fn half_close_is_respected_after_the_upgrade() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = s
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                )
                .await;
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let _ = s
                .write_all(format!("got {} bytes after your half-close", got.len()).as_bytes())
                .await;
        }
    });
    let proxy = Proxy::start("", addr).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(
        b"GET /raw HTTP/1.1\r\nhost: x.test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    s.write_all(&[42u8; 100_000]).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.ends_with("got 100000 bytes after your half-close"),
        "{text}"
    );
    task.abort();
}
