//! Hardening: what a hostile or broken client (or a port scan) can do to the proxy, and the
//! clear answer or close it gets. Peers: raw bytes on a socket, the h2 crate's client (the one
//! hyper uses), hyper's clients.

#[path = "support/proxy.rs"]
mod support;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Proxy, refused_addr};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (length 0, type 4, flags 0, stream 0).
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// An HTTP/1.1 backend that answers with the request headers it saw, one per line.
async fn header_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let text: String = req
                        .headers()
                        .iter()
                        .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                        .collect();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A TCP echo server.
async fn echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Reads until the peer closes; panics if that takes longer than `within`.
async fn closed_within(s: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    let read = tokio::time::timeout(within, s.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "{what}: the proxy held the connection open");
    all
}

/// The proxy still answers a plain request.
async fn still_serves(proxy: &Proxy) {
    let body = support::http1_get(proxy.outbound, "/after").await;
    assert!(body.contains("host"), "{body}");
}

#[tokio::test]
async fn a_preface_followed_by_silence_is_closed_after_the_header_read_timeout() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("limits: {header_read_timeout: 1s}", backend).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(PREFACE).await.expect("preface");
    s.write_all(SETTINGS).await.expect("settings");
    closed_within(&mut s, Duration::from_secs(8), "preface then silence").await;
    proxy.assert_no_open_connections().await;
    task.abort();
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("limits: {idle_timeout: 1s}", backend).await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("http://a.test/")
                .body(Empty::<Bytes>::new())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    drop(resp);
    // The client keeps the connection; the proxy ends it (GOAWAY) once idle.
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("the idle connection was closed")
        .expect("join")
        .expect("a graceful close");
    proxy.assert_no_open_connections().await;
    task.abort();
}

/// The "rapid reset" pattern: open a stream and cancel it at once, thousands of times. The
/// proxy closes the connection (ENHANCE_YOUR_CALM) instead of doing the work for each.
#[tokio::test]
async fn a_reset_flood_closes_the_connection() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("", backend).await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..5000 {
        let req = Request::get("http://a.test/").body(()).expect("req");
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let Ok((_resp, mut body)) = client.send_request(req, false) else {
            break;
        };
        body.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection ended")
        .expect("join");
    // Without a limit the proxy would serve (and forward) every one of these streams and keep
    // the connection; with it the connection is torn down (GOAWAY ENHANCE_YOUR_CALM).
    let err = ended.expect_err("closed by the proxy with an error");
    assert!(
        err.is_go_away() || err.is_io() || err.reason().is_some(),
        "after {sent} resets: {err:?}"
    );
    still_serves(&proxy).await;
    proxy.assert_no_open_connections().await;
    task.abort();
}

#[tokio::test]
async fn a_settings_flood_and_malformed_frames_get_a_close_and_no_leak() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("", backend).await;
    // SETTINGS flood, never reading the ACKs.
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(PREFACE).await.expect("preface");
    let flood: Vec<u8> = SETTINGS.repeat(20_000);
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&flood)).await;
    still_serves(&proxy).await;
    drop(s);
    // Malformed: a DATA frame on stream 0 (a connection error, RFC 9113 §6.1).
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(PREFACE).await.expect("preface");
    s.write_all(SETTINGS).await.expect("settings");
    s.write_all(&[0, 0, 4, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4])
        .await
        .expect("bad frame");
    let answer = closed_within(&mut s, Duration::from_secs(8), "malformed frame").await;
    // The server's SETTINGS, its ACK of ours, then GOAWAY (type 7) with PROTOCOL_ERROR.
    assert!(
        answer.windows(4).any(|w| w[3] == 7 && w[0] == 0),
        "no GOAWAY in {answer:?}"
    );
    // A frame far larger than SETTINGS_MAX_FRAME_SIZE.
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(PREFACE).await.expect("preface");
    s.write_all(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1])
        .await
        .expect("huge frame header");
    closed_within(&mut s, Duration::from_secs(8), "oversized frame").await;
    still_serves(&proxy).await;
    proxy.assert_no_open_connections().await;
    task.abort();
}

#[tokio::test]
async fn an_idle_tcp_connection_is_closed_after_the_listeners_idle_timeout() {
    let (backend, task) = echo().await;
    let yaml = format!(
        "outbound: {{listeners: [{{port: {}, name: tcp-db, tcp_idle_timeout: 1s}}]}}",
        backend.port()
    );
    let proxy = Proxy::start(&yaml, backend).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(b"\x00binary hello").await.expect("write");
    let mut buf = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"\x00binary hello");
    closed_within(&mut s, Duration::from_secs(8), "idle tcp").await;
    proxy.assert_no_open_connections().await;
    task.abort();
}

#[tokio::test]
async fn connections_past_the_listener_cap_are_closed_and_counted() {
    let (backend, task) = echo().await;
    let yaml = format!(
        "limits: {{max_connections_per_listener: 2}}\noutbound: {{listeners: [{{port: {}, protocol: tcp}}]}}",
        backend.port()
    );
    let proxy = Proxy::start(&yaml, backend).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("echo");
        held.push(s);
    }
    let mut third = TcpStream::connect(proxy.outbound).await.expect("connect");
    let got = closed_within(&mut third, Duration::from_secs(5), "over the cap").await;
    assert!(got.is_empty());
    assert_eq!(
        proxy
            .metric("interceptor_proxy_listener_overflow_total{direction=\"Outbound\"}")
            .await,
        1.0
    );
    // A slot frees when a connection ends.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
        let _ = s.write_all(b"y").await;
        let mut b = [0u8; 1];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut b)).await
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no slot came back after a connection closed");
    task.abort();
}

async fn raw_status(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer, not a silent close")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn ambiguous_hosts_and_framing_get_400_not_a_silent_close() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("", backend).await;
    for (what, request) in [
        (
            "two Host headers",
            &b"GET / HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n\r\n"[..],
        ),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nhost: a.test\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
    ] {
        let answer = raw_status(proxy.outbound, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
    }
    // Content-Length with Transfer-Encoding: hyper lets Transfer-Encoding win and drops the
    // Content-Length, so the upstream gets exactly one framing (nothing to smuggle).
    let answer = raw_status(
        proxy.outbound,
        b"POST / HTTP/1.1\r\nhost: a.test\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400") || !answer.contains("content-length: 5"),
        "{answer}"
    );
    // h2: a Host header that disagrees with :authority.
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("http://a.test/")
                .header("host", "b.test")
                .body(Empty::<Bytes>::new())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 400);
    task.abort();
}

#[tokio::test]
async fn a_forged_client_certificate_header_never_reaches_the_app() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("", backend).await;
    for addr in [proxy.outbound, proxy.inbound] {
        let answer = raw_status(
            addr,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nx-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/admin\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            !answer
                .to_ascii_lowercase()
                .contains("x-forwarded-client-cert"),
            "{answer}"
        );
    }
    task.abort();
}

/// A port scan of the pod through the inbound listener: every refused port counts under one
/// passthrough series, not one series per port.
#[tokio::test]
async fn a_port_scan_does_not_create_a_series_per_port() {
    let (backend, task) = header_echo().await;
    let proxy = Proxy::start("", backend).await;
    let mut holds = Vec::new();
    for _ in 0..20 {
        let (addr, hold) = refused_addr();
        holds.push(hold);
        proxy.orig_dst.set(addr);
        let answer = raw_status(
            proxy.inbound,
            b"GET / HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    // The port the app serves keeps its own series.
    proxy.orig_dst.set(backend);
    let _ = raw_status(
        proxy.inbound,
        b"GET / HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n",
    )
    .await;
    let text = proxy.prometheus().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("interceptor_proxy_requests_total{direction=\"Inbound\""))
        .collect();
    assert_eq!(series.len(), 2, "{series:#?}");
    assert!(
        text.contains(
            "interceptor_proxy_requests_total{direction=\"Inbound\",cluster=\"InboundPassthroughCluster\",code=\"503\"} 20"
        ),
        "{series:#?}"
    );
    assert!(
        text.contains(&format!("cluster=\"inbound|{}||\"", backend.port())),
        "{series:#?}"
    );
    task.abort();
}
