//! The L7 proxy on real loopback sockets, in-process (no root, no BPF): the original destination
//! comes from a fixed `OrigDstAddr`, as if interception had redirected the connection.
//! Everything binds port 0 on 127.0.0.1; every loop is bounded in count and time.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use interceptor::proxy::{ProxyConfig, runtime::Bound};
use interceptor_lab::{
    fixed_dst::FixedDst,
    loadgen::{self, LoadSpec, Mode},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

// === backends ===

#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Status(u16),
    Slow(Duration),
}

#[derive(Clone, Debug)]
struct Seen {
    peer: SocketAddr,
    headers: HeaderMap,
}

struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, name, behaviour)
    }

    fn serve(listener: TcpListener, name: &'static str, behaviour: Behaviour) -> Self {
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        async move {
                            record.lock().expect("lock").push(Seen {
                                peer,
                                headers: req.headers().clone(),
                            });
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let len = body.map(|b| b.len()).unwrap_or(0);
                            let status = match behaviour {
                                Behaviour::Ok => 200,
                                Behaviour::Status(s) => s,
                                Behaviour::Slow(d) => {
                                    tokio::time::sleep(d).await;
                                    200
                                }
                            };
                            let mut resp = Response::new(Full::new(Bytes::from(format!(
                                "{name} got {len} bytes"
                            ))));
                            *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn hits(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on (connections are refused).
/// An address that refuses connections for as long as the returned socket lives: bound but never
/// listening, so a test running in parallel cannot be handed the same port (a freed port can be).
fn refused_addr() -> (SocketAddr, socket2::Socket) {
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

// === the proxy under test ===

struct Proxy {
    outbound: SocketAddr,
    inbound: SocketAddr,
    metrics: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Proxy {
    /// Starts the proxy with `yaml`; every connection's original destination is `orig_dst`.
    async fn start(yaml: &str, orig_dst: SocketAddr) -> Self {
        Self::start_polling(yaml, orig_dst, Duration::from_millis(50)).await
    }

    /// Like `start`, checking the config file every `poll`.
    async fn start_polling(yaml: &str, orig_dst: SocketAddr, poll: Duration) -> Self {
        let (config, config_path) = interceptor_lab::loopback_proxy::config("proxy", yaml);
        let config = ProxyConfig {
            config_poll: poll,
            drain_timeout: Duration::from_secs(5),
            ..config
        };
        let bound = Bound::bind(config)
            .expect("bind the proxy")
            .with_orig_dst(Arc::new(FixedDst(orig_dst)));
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
            _dir: TempDir(config_path.parent().expect("config dir").to_owned()),
            config_path,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    async fn prometheus(&self) -> String {
        let (_, body) = get(self.metrics, "metrics", "/stats/prometheus").await;
        body
    }

    /// A sample's value, 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        self.prometheus()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// A sample's value once it is non-zero (the proxy may still be finishing a request), or
    /// as it is after 10 s.
    async fn await_metric(&self, series: &str) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series).await;
            if v != 0.0 || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = get(self.admin, "admin", path).await;
        serde_json::from_str(&body).expect("admin JSON")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// === clients ===

/// One keep-alive HTTP/1.1 connection.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> (StatusCode, String) {
        self.sender.ready().await.expect("ready");
        let resp = tokio::time::timeout(Duration::from_secs(20), self.sender.send_request(req))
            .await
            .expect("response in time")
            .expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&mut self, host: &str, path: &str) -> (StatusCode, String) {
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(req).await
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    Client::connect(addr).await.get(host, path).await
}

/// Writes raw bytes, half-closes, reads until EOF (bounded).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// === tests ===

/// One cluster `svc` of `app` (plus `cluster_extra`, a line of its settings), routed from
/// outbound port 9080 for host `svc`, retried twice on reset, 5xx and connect failure.
fn retrying_svc_config(app: SocketAddr, cluster_extra: &str) -> String {
    format!(
        r#"
clusters:
  - name: svc
    endpoints: ["{app}"]
    {cluster_extra}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: svc
          domains: [svc]
          routes:
            - route:
                cluster: svc
                retry_policy: {{num_retries: 2, retry_on: "reset,5xx,connect-failure", base_interval: 1ms, max_interval: 1ms}}
"#
    )
}

fn routing_config(a: SocketAddr, b: SocketAddr, port: u16) -> String {
    format!(
        r#"
clusters:
  - {{name: a, endpoints: ["{a}"]}}
  - {{name: b, endpoints: ["{b}"]}}
outbound:
  listeners:
    - port: {port}
      virtual_hosts:
        - name: reviews
          services: [reviews.default.svc.cluster.local]
          routes:
            - match: {{prefix: /v2/}}
              route: {{cluster: b}}
            - match: {{prefix: /, headers: [{{name: end-user, exact: jason}}]}}
              route: {{cluster: b}}
            - route: {{cluster: a}}
        - name: details
          domains: ["details", "*.details.example"]
          routes:
            - match: {{path: /details}}
              route: {{cluster: b}}
"#
    )
}

#[tokio::test]
async fn routes_by_host_path_and_header_and_passes_unknown_hosts_through() {
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let orig = Backend::start("orig", Behaviour::Ok).await;
    let proxy = Proxy::start(&routing_config(a.addr, b.addr, orig.addr.port()), orig.addr).await;
    let mut c = Client::connect(proxy.outbound).await;
    let cases = [
        ("reviews", "/", "a"),
        ("reviews:9080", "/", "a"),
        ("reviews.default", "/x", "a"),
        ("reviews.default.svc.cluster.local", "/v2/x", "b"),
        ("x.details.example", "/details", "b"),
        ("unknown.example", "/", "orig"),
    ];
    for (host, path, want) in cases {
        let (status, body) = c.get(host, path).await;
        assert_eq!(status, 200, "{host}{path}");
        assert!(body.starts_with(want), "{host}{path} → {body}, want {want}");
    }
    let req = Request::get("/")
        .header("host", "reviews")
        .header("end-user", "jason")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert!(c.send(req).await.1.starts_with('b'));
    // A known host without a matching route: Envoy's 404.
    let (status, _) = c.get("details", "/other").await;
    assert_eq!(status, 404);
    // All of it on one downstream connection, the Host preserved upstream.
    let a_seen = a.seen();
    assert_eq!(a_seen.len(), 3);
    assert_eq!(a_seen[0].headers["host"], "reviews");
    assert_eq!(orig.hits(), 1);
}

#[tokio::test]
async fn weighted_split_stays_within_tolerance() {
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let yaml = format!(
        r#"
clusters:
  - {{name: a, endpoints: ["{}"]}}
  - {{name: b, endpoints: ["{}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          domains: [reviews]
          routes:
            - route:
                weighted_clusters: [{{cluster: a, weight: 80}}, {{cluster: b, weight: 20}}]
"#,
        a.addr, b.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let n = 2000;
    let result = loadgen::run(LoadSpec::new(
        proxy.outbound,
        "reviews",
        "/",
        4,
        n,
        Duration::from_secs(60),
        Mode::KeepAlive,
    ))
    .await;
    assert_eq!(result.ok, n, "{result:?}");
    let share_a = a.hits() as f64 / n as f64;
    // Binomial σ at n = 2000, p = 0.8 is 0.9 points: ±4 points is > 4σ.
    assert!((0.76..=0.84).contains(&share_a), "a got {share_a}");
    assert_eq!(a.hits() + b.hits(), n as usize);
}

#[tokio::test]
async fn connect_failure_is_retried_on_the_next_endpoint() {
    let live = Backend::start("live", Behaviour::Ok).await;
    let (dead, _dead_socket) = refused_addr();
    let yaml = format!(
        r#"
clusters:
  - name: svc
    endpoints: ["{dead}", "{}"]
    outlier_detection: {{consecutive_errors: 0}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: svc, domains: [svc], routes: [{{route: {{cluster: svc}}}}]}}
"#,
        live.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let mut c = Client::connect(proxy.outbound).await;
    for _ in 0..10 {
        let (status, body) = c.get("svc", "/").await;
        assert_eq!(status, 200);
        assert!(body.starts_with("live"));
    }
    // Every first attempt that went to the dead endpoint was retried once, on the live one.
    let svc = cluster_json(&proxy, "svc").await;
    let retries = svc["stats"]["rq_retry"].as_u64().expect("n");
    assert!(retries >= 1, "{svc}");
    assert_eq!(
        svc["stats"]["cx_connect_fail"].as_u64(),
        Some(retries),
        "{svc}"
    );
    let second_attempts = live
        .seen()
        .iter()
        .filter(|s| s.headers["x-envoy-attempt-count"] == "2")
        .count();
    assert_eq!(second_attempts as u64, retries);
    assert_eq!(live.hits(), 10);
    assert_eq!(
        proxy
            .metric("interceptor_proxy_retries_total{direction=\"Outbound\",cluster=\"svc\"}")
            .await,
        retries as f64
    );
}

async fn cluster_json(proxy: &Proxy, name: &str) -> serde_json::Value {
    let clusters = proxy.admin_json("/clusters?format=json").await;
    clusters
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .expect("cluster")
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_ejected() {
    let live = Backend::start("live", Behaviour::Ok).await;
    let (dead, _dead_socket) = refused_addr();
    let yaml = format!(
        r#"
clusters:
  - name: svc
    endpoints: ["{dead}", "{}"]
    outlier_detection: {{consecutive_errors: 5, base_ejection_time: 10m}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: svc, domains: [svc], routes: [{{route: {{cluster: svc}}}}]}}
"#,
        live.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let mut c = Client::connect(proxy.outbound).await;
    for _ in 0..20 {
        assert_eq!(c.get("svc", "/").await.0, 200);
    }
    let svc = cluster_json(&proxy, "svc").await;
    let dead_ep = &svc["endpoints"][0];
    assert_eq!(dead_ep["address"], dead.to_string());
    assert_eq!(dead_ep["health"], "ejected", "{svc}");
    assert_eq!(dead_ep["times_ejected"], 1);
    assert_eq!(svc["stats"]["outlier_ejections"], 1);
    // Five failures ejected it; after that no request met it again.
    assert_eq!(svc["stats"]["cx_connect_fail"], 5, "{svc}");
    assert_eq!(svc["endpoints"][1]["health"], "healthy");
}

/// With least-request both endpoints are equally likely on every pick, so only the
/// `previous_hosts` predicate keeps a retry off the endpoint that just answered 503.
async fn failures_with_previous_hosts(previous_hosts: bool) -> u64 {
    let bad = Backend::start("bad", Behaviour::Status(503)).await;
    let good = Backend::start("good", Behaviour::Ok).await;
    let yaml = format!(
        r#"
clusters:
  - name: svc
    endpoints: ["{}", "{}"]
    lb_policy: least_request
    outlier_detection: {{consecutive_errors: 0}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: svc
          domains: [svc]
          routes:
            - route:
                cluster: svc
                retry_policy: {{num_retries: 1, previous_hosts: {previous_hosts}, base_interval: 1ms, max_interval: 1ms}}
"#,
        bad.addr, good.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let r = loadgen::run(LoadSpec::new(
        proxy.outbound,
        "svc",
        "/",
        1,
        200,
        Duration::from_secs(60),
        Mode::KeepAlive,
    ))
    .await;
    assert_eq!(r.responses, 200, "{r:?}");
    r.status_codes.get(&503).copied().unwrap_or(0)
}

#[tokio::test]
async fn previous_hosts_keeps_retries_off_the_failed_endpoint() {
    assert_eq!(failures_with_previous_hosts(true).await, 0);
    // Without it, a quarter of requests pick the bad endpoint twice (P(no failure) ≈ 1e-25).
    assert!(failures_with_previous_hosts(false).await > 0);
}

#[tokio::test]
async fn upstream_down_is_503_after_the_retries() {
    let (dead, _dead_socket) = refused_addr();
    let yaml = format!(
        r#"
clusters:
  - {{name: svc, endpoints: ["{dead}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: svc, domains: [svc], routes: [{{route: {{cluster: svc}}}}]}}
"#
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let (status, body) = get(proxy.outbound, "svc", "/").await;
    assert_eq!(status, 503);
    assert!(body.contains("connection failure"), "{body}");
    assert_eq!(
        proxy
            .metric("interceptor_proxy_retries_total{direction=\"Outbound\",cluster=\"svc\"}")
            .await,
        2.0,
        "Istio's default: 2 retries"
    );
    assert_eq!(
        proxy
            .metric(
                "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"svc\",code=\"503\"}"
            )
            .await,
        1.0
    );
}

/// A client that declares a body and hangs up half-way through it: over HTTP/1.1 hyper's client
/// reports that as a user error caused by the request body. It is the client's fault, so the
/// endpoint is neither retried nor blamed (one blamed failure would eject it here), and the
/// client gets a 400, not a 5xx.
#[tokio::test]
async fn a_request_body_cut_short_over_http1_is_not_retried_nor_blamed_on_the_endpoint() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let yaml = retrying_svc_config(
        app.addr,
        "outlier_detection: {consecutive_errors: 1, base_ejection_time: 10m}",
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n")
        .await
        .expect("write head");
    s.write_all(&[b'x'; 1000])
        .await
        .expect("write part of the body");
    // Let the head and the first bytes reach the app before the client goes away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.hits() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.hits(), 1, "the request reached the app");
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    if let Some(status) = status_of(&answer) {
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    }
    // The proxy may still be finishing the attempt: wait for it to be counted.
    let series =
        "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"svc\",code=\"400\"}";
    assert_eq!(
        proxy.await_metric(series).await,
        1.0,
        "{}",
        proxy.prometheus().await
    );
    assert_eq!(app.hits(), 1, "not retried");
    assert_eq!(
        proxy
            .metric("interceptor_proxy_retries_total{direction=\"Outbound\",cluster=\"svc\"}")
            .await,
        0.0
    );
    let svc = cluster_json(&proxy, "svc").await;
    assert_eq!(svc["endpoints"][0]["health"], "healthy", "{svc}");
    assert_eq!(svc["stats"]["outlier_ejections"], 0, "{svc}");
}

/// hyper ends an h2 request body cleanly when the client resets its stream with NO_ERROR, so a
/// retryable body read whole looked complete: the app was handed the declared content-length
/// and fewer bytes. It must be answered 400 and never forwarded.
#[tokio::test]
async fn an_h2_request_body_reset_with_no_error_part_way_never_reaches_the_app() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let yaml = retrying_svc_config(app.addr, "");
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let tcp = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.expect("h2 ready");
    let req = Request::post("http://svc/upload")
        .header("content-length", "1000")
        .body(())
        .expect("request");
    let (_response, mut send) = client.send_request(req, false).expect("send head");
    send.send_data(Bytes::from_static(&[b'x'; 400]), false)
        .expect("send part of the body");
    // Let the head and the first bytes reach the proxy before the reset.
    tokio::time::sleep(Duration::from_millis(200)).await;
    send.send_reset(h2::Reason::NO_ERROR);
    let series =
        "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"svc\",code=\"400\"}";
    assert_eq!(
        proxy.await_metric(series).await,
        1.0,
        "{}",
        proxy.prometheus().await
    );
    // Anything forwarded would have reached the app by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.hits(), 0, "a body cut short was forwarded");
    conn.abort();
}

#[tokio::test]
async fn route_timeout_answers_504() {
    let slow = Backend::start("slow", Behaviour::Slow(Duration::from_secs(30))).await;
    let yaml = format!(
        r#"
clusters:
  - {{name: slow, endpoints: ["{}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: slow, domains: [slow], routes: [{{route: {{cluster: slow, timeout: 200ms}}}}]}}
"#,
        slow.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let (status, body) = get(proxy.outbound, "slow", "/").await;
    assert_eq!(status, 504);
    assert_eq!(body, "upstream request timeout\n");
}

#[tokio::test]
async fn non_http_bytes_pass_through_byte_exact_with_half_close() {
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut s, _) = echo.accept().await.expect("accept");
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    let proxy = Proxy::start("", echo_addr).await;
    // Pseudo-random bytes, as the end-to-end suite sends.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let payload: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, read) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .expect("in time");
    read.expect("read");
    assert!(
        back == payload,
        "{} bytes back of {}",
        back.len(),
        payload.len()
    );
    server.await.expect("server");
    assert_eq!(
        proxy
            .metric("interceptor_proxy_detected_connections_total{direction=\"Outbound\",protocol=\"Tcp\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn inbound_goes_to_the_original_destination_from_127_0_0_6_with_headers() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let proxy = Proxy::start("", app.addr).await;
    let mut c = Client::connect(proxy.inbound).await;
    let (status, _) = c.get("reviews", "/").await;
    assert_eq!(status, 200);
    let req = Request::get("/")
        .header("host", "reviews")
        .header("x-request-id", "given")
        .header("x-forwarded-for", "10.0.0.1")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(c.send(req).await.0, 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].peer.ip().to_string(), "127.0.0.6");
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen[0].headers["x-envoy-attempt-count"], "1");
    assert_eq!(
        seen[0].headers["x-request-id"].len(),
        36,
        "a generated UUID"
    );
    assert_eq!(seen[1].headers["x-request-id"], "given");
    assert_eq!(seen[1].headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    let series = format!(
        "interceptor_proxy_requests_total{{direction=\"Inbound\",cluster=\"inbound|{}||\",code=\"200\"}}",
        app.addr.port()
    );
    assert_eq!(proxy.metric(&series).await, 2.0);
}

#[tokio::test]
async fn metrics_count_requests_latency_connections_and_bytes() {
    let app = Backend::start("a", Behaviour::Ok).await;
    let not_found = Backend::start("nf", Behaviour::Status(404)).await;
    let yaml = format!(
        r#"
clusters:
  - {{name: a, endpoints: ["{}"]}}
  - {{name: nf, endpoints: ["{}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: a, domains: [a], routes: [{{route: {{cluster: a}}}}]}}
        - {{name: nf, domains: [nf], routes: [{{route: {{cluster: nf}}}}]}}
"#,
        app.addr, not_found.addr
    );
    let proxy = Proxy::start(&yaml, "127.0.0.1:9080".parse().expect("addr")).await;
    let mut c = Client::connect(proxy.outbound).await;
    for _ in 0..7 {
        assert_eq!(c.get("a", "/").await.0, 200);
    }
    for _ in 0..3 {
        assert_eq!(c.get("nf", "/").await.0, 404);
    }
    drop(c);
    let m = |s: &str| s.to_owned();
    let text = proxy.prometheus().await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(
        value(&m(
            "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"a\",code=\"200\"}"
        )),
        7.0
    );
    assert_eq!(
        value(&m(
            "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"nf\",code=\"404\"}"
        )),
        3.0
    );
    assert_eq!(
        value(&m(
            "interceptor_proxy_request_duration_seconds_count{direction=\"Outbound\",cluster=\"a\"}"
        )),
        7.0
    );
    assert_eq!(
        value(&m(
            "interceptor_proxy_connections_total{direction=\"Outbound\"}"
        )),
        1.0
    );
    // The connection is closed: the gauge goes back to 0 and its bytes are counted.
    tokio::time::timeout(Duration::from_secs(10), async {
        while proxy
            .metric("interceptor_proxy_active_connections{direction=\"Outbound\"}")
            .await
            != 0.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection closed in time");
    let sent = proxy
        .metric("interceptor_proxy_bytes_total{direction=\"Outbound\",flow=\"Sent\"}")
        .await;
    let received = proxy
        .metric("interceptor_proxy_bytes_total{direction=\"Outbound\",flow=\"Received\"}")
        .await;
    // 10 requests of at least `GET / HTTP/1.1\r\nhost: a\r\n\r\n` (26 bytes), 10 responses.
    assert!(sent >= 260.0, "{sent}");
    assert!(
        received >= 10.0 * "HTTP/1.1 200 OK\r\n".len() as f64,
        "{received}"
    );
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_status_codes_and_the_proxy_stays_up() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let yaml = "limits:\n  max_request_body_bytes: 1000\n  max_request_headers_kb: 16\n  header_read_timeout: 300ms\n";
    let proxy = Proxy::start(yaml, app.addr).await;
    // Not a valid header line.
    let raw = raw_exchange(
        proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_of(&raw),
        Some(400),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Head larger than the limit.
    let mut big = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..400 {
        big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(60)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let raw = raw_exchange(proxy.outbound, &big).await;
    assert_eq!(
        status_of(&raw),
        Some(431),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Body over the limit, declared.
    let raw = raw_exchange(
        proxy.outbound,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_of(&raw),
        Some(413),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Body over the limit, chunked (no length known in advance).
    let mut chunked =
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("1f4\r\n{}\r\n", "z".repeat(500)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let raw = raw_exchange(proxy.outbound, &chunked).await;
    assert_eq!(
        status_of(&raw),
        Some(413),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Slowloris: half a request head, then nothing. The proxy closes the connection.
    let mut slow = TcpStream::connect(proxy.outbound).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the proxy kept a slowloris connection open");
    // And still serves.
    let (status, body) = get(proxy.outbound, "a", "/").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("app"));
    // A small body goes through intact.
    let req = Request::post("/")
        .header("host", "a")
        .body(Full::new(Bytes::from(vec![b'q'; 999])))
        .expect("req");
    assert_eq!(
        Client::connect(proxy.outbound).await.send(req).await.1,
        "app got 999 bytes"
    );
}

/// One HTTP/1.1 response read off a raw connection: (status, headers lower-cased, body). Bytes
/// past it (a pipelined next response) stay in `buf`.
async fn read_response(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> (u16, Vec<(String, String)>, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .expect("content-length");
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response body in time")
            .expect("read");
        assert!(n > 0, "connection closed inside a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    buf.drain(..head_end + len);
    (status, headers, body)
}

/// Between requests the proxy stops hyper and keeps only the socket; none of that may show:
/// heads split across writes, pipelined requests (whole or with the next head cut short), bodies
/// that arrive in pieces and pauses long enough to park all keep the one connection alive and
/// every answer right.
#[tokio::test]
async fn keep_alive_survives_pauses_pipelining_and_requests_in_pieces() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let proxy = Proxy::start("", app.addr).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    let mut buf = Vec::new();
    let get = |n: usize| format!("GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes();
    let no_close = |headers: &[(String, String)]| {
        !headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"))
    };
    // The first head in two writes, with a pause between them.
    s.write_all(b"GET /1 HTTP/1.1\r\nHo").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: a\r\n\r\n").await.expect("write");
    let (status, headers, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "app got 0 bytes"));
    assert!(no_close(&headers), "{headers:?}");
    // A pause longer than the park delay, then the next request.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(&get(2)).await.expect("write");
    let (status, headers, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert!(no_close(&headers), "{headers:?}");
    // Two requests in one write.
    s.write_all(&[get(3), get(4)].concat())
        .await
        .expect("write");
    for _ in 0..2 {
        let (status, headers, _) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 200);
        assert!(no_close(&headers), "{headers:?}");
    }
    // A request and the first half of the next one; the rest after a pause.
    let next = get(6);
    s.write_all(&[get(5), next[..12].to_vec()].concat())
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(&next[12..]).await.expect("write");
    let (status, headers, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert!(no_close(&headers), "{headers:?}");
    // A chunked body in pieces, with a pause inside it.
    s.write_all(b"POST /7 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"6\r\n world\r\n0\r\n\r\n")
        .await
        .expect("write");
    let (status, headers, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "app got 11 bytes"));
    assert!(no_close(&headers), "{headers:?}");
    assert!(buf.is_empty(), "unexpected bytes: {buf:?}");
    assert_eq!(app.hits(), 7);
    assert_eq!(
        proxy
            .metric("interceptor_proxy_connections_total{direction=\"Outbound\"}")
            .await,
        1.0,
        "every request on the one connection"
    );
}

/// As with hyper's own timer: a keep-alive connection that sends no next head within
/// `header_read_timeout` is closed (and one that does is served).
#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_header_read_timeout() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let proxy = Proxy::start("limits: {header_read_timeout: 300ms}\n", app.addr).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut s, &mut buf).await.0, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an idle connection outlived the header read timeout"
    );
    assert!(rest.is_empty(), "{rest:?}");
}

/// Requests the proxy answers itself (here 404: no route) are exchanges too: a connection
/// sending them more often than `header_read_timeout` is never cut.
#[tokio::test]
async fn locally_answered_requests_keep_the_connection_alive() {
    let app = Backend::start("app", Behaviour::Ok).await;
    let yaml = format!(
        r#"
limits: {{header_read_timeout: 1s}}
clusters: [{{name: app, endpoints: ["{}"]}}]
outbound:
  listeners:
    - port: {}
      virtual_hosts:
        - {{name: a, domains: [a], routes: [{{match: {{prefix: /only}}, route: {{cluster: app}}}}]}}
"#,
        app.addr,
        app.addr.port()
    );
    let proxy = Proxy::start(&yaml, app.addr).await;
    let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
    let mut buf = Vec::new();
    // 10 requests 250 ms apart: 2.5 s, over two header timeouts (a pause of 250 ms leaves the
    // 1 s timeout ample slack on a loaded machine).
    for n in 0..10 {
        s.write_all(format!("GET /nope/{n} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("write: the connection was cut");
        let (status, headers, _) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 404, "request {n}");
        assert!(
            !headers
                .iter()
                .any(|(k, v)| k == "connection" && v == "close"),
            "request {n}: {headers:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(app.hits(), 0);
}

/// An upstream may answer before it has read the request body; the exchange ends when the
/// body is done, on the upstream side's task. The connection must still notice, and close
/// once it has been idle for `header_read_timeout`.
#[tokio::test]
async fn a_connection_whose_upload_outlived_its_response_still_times_out_when_idle() {
    // An upstream that answers as soon as it has the head, pauses (the body backs up through
    // the proxy into the client), then reads the body to the end.
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    let body_read = Arc::new(Mutex::new(0usize));
    let read_count = body_read.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = upstream.accept().await {
            let read_count = read_count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 16384];
                let end = loop {
                    if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                };
                *read_count.lock().expect("lock") += head.len() - end;
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                    .await;
                tokio::time::sleep(Duration::from_millis(800)).await;
                while let Ok(n) = c.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    *read_count.lock().expect("lock") += n;
                }
            });
        }
    });
    let proxy = Proxy::start("limits: {header_read_timeout: 500ms}\n", up_addr).await;
    let s = TcpStream::connect(proxy.outbound).await.expect("connect");
    // More than the socket buffers on the way hold, so the last of it is read by the proxy
    // only once the upstream drains: after the response went out.
    const BODY: usize = 16 << 20;
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.expect("write head");
        let piece = vec![b'x'; 1 << 20];
        for _ in 0..BODY >> 20 {
            wr.write_all(&piece).await.expect("write body");
        }
        wr
    });
    let mut buf = Vec::new();
    let (status, _, body) = read_response(&mut rd, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "early"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while *body_read.lock().expect("lock") < BODY && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *body_read.lock().expect("lock"),
        BODY,
        "the whole body reached the upstream"
    );
    let _wr = writer.await.expect("writer");
    // Now idle: closed after the header read timeout (generously bounded here).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an idle connection outlived the header read timeout"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_routed() {
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let orig = Backend::start("orig", Behaviour::Ok).await;
    let proxy = Proxy::start(&routing_config(a.addr, b.addr, orig.addr.port()), orig.addr).await;
    let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    for (authority, want) in [("reviews", "a"), ("details", "b")] {
        let path = if want == "b" { "/details" } else { "/" };
        let req = Request::get(format!("http://{authority}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("req");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.starts_with(want.as_bytes()));
    }
    assert_eq!(a.seen()[0].headers["host"], "reviews");
}

#[tokio::test]
async fn reload_under_load_switches_routes_without_failed_requests() {
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let config = |cluster: &str| {
        format!(
            r#"
clusters:
  - {{name: a, endpoints: ["{}"]}}
  - {{name: b, endpoints: ["{}"]}}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - {{name: svc, domains: [svc], routes: [{{route: {{cluster: {cluster}}}}}]}}
"#,
            a.addr, b.addr
        )
    };
    let proxy = Proxy::start(&config("a"), "127.0.0.1:9080".parse().expect("addr")).await;
    let load = tokio::spawn(loadgen::run(LoadSpec::new(
        proxy.outbound,
        "svc",
        "/",
        4,
        6000,
        Duration::from_secs(60),
        Mode::KeepAlive,
    )));
    let path = proxy.config_path.clone();
    let write = |text: String| {
        // Replace atomically, as a ConfigMap update does.
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).expect("tmp");
        f.write_all(text.as_bytes()).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
    };
    let generation =
        |j: &serde_json::Value| j["source"]["generation"].as_u64().expect("generation");
    // Wait until some load went to a, switch to b, then try an invalid config.
    tokio::time::timeout(Duration::from_secs(30), async {
        while a.hits() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("load reached a");
    write(config("b"));
    tokio::time::timeout(Duration::from_secs(30), async {
        while b.hits() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the reload moved traffic to b");
    let before_bad = generation(&proxy.admin_json("/config_dump").await);
    write("clusters: [{name: c, endpoints: [not-an-address]}]\n".into());
    tokio::time::timeout(Duration::from_secs(30), async {
        while proxy
            .metric("interceptor_proxy_config_reloads_total{result=\"Rejected\"}")
            .await
            < 1.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the bad config was seen and rejected");
    let result = load.await.expect("load");
    assert_eq!(result.errors, 0, "{result:?}");
    assert_eq!(result.ok, result.responses, "{result:?}");
    assert_eq!(a.hits() + b.hits(), result.responses as usize);
    // The invalid file left the running config in place.
    let dump = proxy.admin_json("/config_dump").await;
    assert_eq!(generation(&dump), before_bad);
    assert_eq!(dump["config"]["clusters"][1]["name"], "b");
    assert!(
        proxy
            .metric("interceptor_proxy_config_reloads_total{result=\"Applied\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn sigterm_drain_finishes_in_flight_requests_then_stops_accepting() {
    let slow = Backend::start("slow", Behaviour::Slow(Duration::from_millis(500))).await;
    let mut proxy = Proxy::start("", slow.addr).await;
    let outbound = proxy.outbound;
    let in_flight = tokio::spawn(async move { get(outbound, "slow", "/").await });
    tokio::time::timeout(Duration::from_secs(10), async {
        while slow.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("request reached the backend");
    proxy.shutdown().await;
    let (status, body) = in_flight.await.expect("join");
    assert_eq!(status, 200);
    assert!(body.starts_with("slow"));
    assert!(
        TcpStream::connect(outbound).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn admin_dumps_the_effective_config_and_cluster_health() {
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let proxy = Proxy::start(
        &routing_config(a.addr, b.addr, 9080),
        "127.0.0.1:9080".parse().expect("addr"),
    )
    .await;
    let dump = proxy.admin_json("/config_dump").await;
    // Defaults are filled in.
    assert_eq!(dump["config"]["limits"]["max_request_headers_kb"], 60);
    assert_eq!(
        dump["config"]["outbound"]["listeners"][0]["virtual_hosts"][0]["routes"][2]["route"]["retry_policy"]
            ["num_retries"],
        2
    );
    let domains: Vec<String> =
        serde_json::from_value(dump["virtual_hosts"][0]["virtual_hosts"][0]["domains"].clone())
            .expect("domains");
    for d in [
        "reviews",
        "reviews:9080",
        "reviews.default.svc.cluster.local",
    ] {
        assert!(domains.contains(&d.to_owned()), "{d} in {domains:?}");
    }
    let (status, text) = get(proxy.admin, "admin", "/clusters").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(&format!("a::{}::health::healthy", a.addr)),
        "{text}"
    );
    assert_eq!(get(proxy.outbound, "reviews", "/").await.0, 200);
    let (status, stats) = get(proxy.admin, "admin", "/stats").await;
    assert_eq!(status, 200);
    assert!(
        stats.contains(
            "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"a\",code=\"200\"}: 1"
        ),
        "{stats}"
    );
    assert_eq!(get(proxy.admin, "admin", "/ready").await.0, 200);
}

#[tokio::test]
async fn sighup_reloads_the_config_at_once() {
    // Our own SIGHUP handler first: from then on the signal never takes the process down, even
    // before the proxy's reload task has registered its handler.
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("handler");
    let a = Backend::start("a", Behaviour::Ok).await;
    let b = Backend::start("b", Behaviour::Ok).await;
    let config = |cluster: &str| {
        format!(
            "clusters: [{{name: a, endpoints: [\"{}\"]}}, {{name: b, endpoints: [\"{}\"]}}]\n\
             outbound:\n  listeners:\n  - port: 9080\n    virtual_hosts:\n    - {{name: s, \
             domains: [s], routes: [{{route: {{cluster: {cluster}}}}}]}}\n",
            a.addr, b.addr
        )
    };
    // The file is never polled during the test: only SIGHUP can bring the change in.
    let proxy = Proxy::start_polling(
        &config("a"),
        "127.0.0.1:9080".parse().expect("addr"),
        Duration::from_secs(3600),
    )
    .await;
    let mut c = Client::connect(proxy.outbound).await;
    assert!(c.get("s", "/").await.1.starts_with('a'));
    std::fs::write(&proxy.config_path, config("b")).expect("rewrite");
    // SAFETY: kill(2) on our own pid.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise SIGHUP");
    let _ = tokio::time::timeout(Duration::from_secs(5), hup.recv()).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if c.get("s", "/").await.1.starts_with('b') {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("SIGHUP applied the new config");
    // Same keep-alive connection before and after the reload.
    assert_eq!(
        proxy
            .metric("interceptor_proxy_connections_total{direction=\"Outbound\"}")
            .await,
        1.0
    );
}
