//! The proxy under test for the protocol tests (gRPC, WebSocket, HTTP/2 hardening): in-process on
//! 127.0.0.1 port 0, the original destination from a settable `OrigDstAddr`, as if interception
//! had redirected the connection. No root, no BPF.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use interceptor::{
    proxy::runtime::Bound,
    proxy::{ProxyConfig, orig_dst::OrigDstAddr},
};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};

/// Every connection was "redirected" from the destination set last.
#[derive(Clone)]
pub(crate) struct OrigDst(pub Arc<Mutex<SocketAddr>>);

impl OrigDst {
    pub(crate) fn set(&self, addr: SocketAddr) {
        *self.0.lock().expect("lock") = addr;
    }
}

impl OrigDstAddr for OrigDst {
    fn outbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Ok(*self.0.lock().expect("lock"))
    }

    fn inbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Ok(*self.0.lock().expect("lock"))
    }
}

pub(crate) struct Proxy {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub orig_dst: OrigDst,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Proxy {
    /// Starts the proxy with the config `yaml`; connections "were going to" `orig_dst`.
    pub(crate) async fn start(yaml: &str, orig_dst: SocketAddr) -> Self {
        let (config, config_path) = interceptor_lab::loopback_proxy::config("protocols", yaml);
        let dir = config_path.parent().expect("config dir").to_owned();
        let config = ProxyConfig {
            config_poll: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(2),
            workers: 1,
            ..config
        };
        let orig = OrigDst(Arc::new(Mutex::new(orig_dst)));
        let bound = Bound::bind(config)
            .expect("bind the proxy")
            .with_orig_dst(Arc::new(orig.clone()));
        let (outbound, inbound, metrics, admin) =
            (bound.outbound, bound.inbound, bound.metrics, bound.admin);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Self {
            outbound,
            inbound,
            metrics,
            admin,
            orig_dst: orig,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    pub(crate) async fn prometheus(&self) -> String {
        http1_get(self.metrics, "/stats/prometheus").await
    }

    /// A sample's value (the line starting with `series`), 0 when absent.
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        self.prometheus()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (bounded) until the open-connection gauges are back to 0.
    pub(crate) async fn assert_no_open_connections(&self) {
        let mut last = String::new();
        for _ in 0..100 {
            let text = self.prometheus().await;
            let open: f64 = text
                .lines()
                .filter(|l| l.starts_with("interceptor_proxy_active_connections{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if open == 0.0 {
                return;
            }
            last = text;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("connections still open after 5 s:\n{last}");
    }

    pub(crate) async fn admin_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&http1_get(self.admin, path).await).expect("admin JSON")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET over a fresh HTTP/1.1 connection; the body as text.
pub(crate) async fn http1_get(addr: SocketAddr, path: &str) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "local")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// An address that refuses connections while the socket lives (bound, never listening).
pub(crate) fn refused_addr() -> (SocketAddr, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    let addr = s
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet address");
    (addr, s)
}
