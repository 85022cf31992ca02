//! The DNS proxy in-process on loopback (no BPF; interception is faked by the TCP listener's
//! `OrigDstAddr`): dnsmasq (Debian `dnsmasq-base`) is the upstream resolver, the clients are
//! `dig` (bind9-dnsutils) and hickory's resolver — none of them written here. Everything binds
//! 127.0.0.1/::1 port 0; every wait and every loop is bounded.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use interceptor::{
    proxy::runtime::Bound,
    proxy::{ProxyConfig, dns::DnsSettings, orig_dst::OrigDstAddr},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::oneshot,
    task::JoinHandle,
};

// === dnsmasq, the upstream resolver ===

/// A TXT record bigger than dnsmasq's UDP limit (1232 B): forces a truncated UDP answer.
fn big_txt() -> String {
    (0..8)
        .map(|i| format!("\"{}\"", char::from(b'a' + i).to_string().repeat(200)))
        .collect::<Vec<_>>()
        .join(",")
}

struct Dnsmasq {
    addr: SocketAddr,
    child: Child,
}

impl Dnsmasq {
    /// dnsmasq on 127.0.0.1 (a free port), knowing `upstream.test`, `both.test` and
    /// `big.test`, with `ttl` seconds on its answers.
    fn start(ttl: u32) -> Self {
        let port = free_port();
        let child = Command::new("dnsmasq")
            .args([
                "-k",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                "--user=root",
                &format!("--port={port}"),
                &format!("--local-ttl={ttl}"),
                "--address=/upstream.test/198.18.5.5",
                "--address=/both.test/198.18.5.6",
                "--address=/both.test/fd00:198:18::56",
                &format!("--txt-record=big.test,{}", big_txt()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base; cargo xtask setup does)");
        let this = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while dig(this.addr, &["+short", "upstream.test"]).trim() != "198.18.5.5" {
            assert!(Instant::now() < deadline, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        this
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    // Free for UDP and TCP at once (both are what dnsmasq binds).
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// `dig @addr -p port ARGS`, one try, bounded.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=5"])
        .args(args)
        .output()
        .expect("dig (apt-get install bind9-dnsutils; cargo xtask setup does)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_of(dig_output: &str) -> String {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_owned()
}

/// The TTLs of the answer section.
fn ttls(dig_output: &str) -> Vec<u32> {
    dig_output
        .split(";; ANSWER SECTION:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

fn flags_of(dig_output: &str) -> String {
    dig_output
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_owned()
}

// === the proxy ===

/// Every TCP connection "was going" to this resolver, as interception would report.
struct Fixed(SocketAddr);

impl OrigDstAddr for Fixed {
    fn outbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Ok(self.0)
    }

    fn inbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Ok(self.0)
    }
}

/// Nothing captured: SO_ORIGINAL_DST has no answer.
struct NoOrigDst;

impl OrigDstAddr for NoOrigDst {
    fn outbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn inbound(&self, _: &TcpStream) -> std::io::Result<SocketAddr> {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    }
}

const MESH: &str = r#"
namespace: default
dns:
  ttl: 45s
  upstream_timeout: 1s
  services:
    - name: reviews.default
      addresses: [198.18.0.7, "fd00:198:18::7"]
  hosts:
    - name: api.example.com
      addresses: [198.18.0.9]
"#;

struct Proxy {
    dns: SocketAddr,
    dns_v6: Option<SocketAddr>,
    metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    dir: std::path::PathBuf,
}

impl Proxy {
    async fn start(yaml: &str, upstreams: Vec<SocketAddr>, orig_dst: Arc<dyn OrigDstAddr>) -> Self {
        let (config, config_path) = interceptor_lab::loopback_proxy::config("dns", yaml);
        let dir = config_path.parent().expect("config dir").to_owned();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = ProxyConfig {
            dns: DnsSettings {
                listen: Some(any),
                listen_v6: Some("[::1]:0".parse().expect("addr")),
                upstreams,
                ..DnsSettings::default()
            },
            ..config
        };
        let bound = Bound::bind(config)
            .expect("bind the proxy")
            .with_orig_dst(orig_dst);
        let dns = bound.dns[0];
        let dns_v6 = bound.dns.get(1).copied();
        let metrics = bound.metrics;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Self {
            dns,
            dns_v6,
            metrics,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// `interceptor_proxy_dns_queries_total{transport, result}`, 0 when absent.
    async fn queries(&self, transport: &str, result: &str) -> f64 {
        // Label values are the variant names (the proxy's metrics convention).
        let cap = |s: &str| s[..1].to_uppercase() + &s[1..];
        let (transport, result) = (cap(transport), cap(result));
        let mut s = TcpStream::connect(self.metrics).await.expect("metrics");
        s.write_all(b"GET /stats/prometheus HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
            .await
            .expect("metrics in time")
            .expect("read");
        let series = format!(
            "interceptor_proxy_dns_queries_total{{transport=\"{transport}\",result=\"{result}\"}}"
        );
        body.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the proxy stops in time")
                .expect("no panic");
        }
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

/// dig from a blocking thread (the proxy runs on this runtime).
async fn dig_async(server: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dig(server, &args)
    })
    .await
    .expect("dig thread")
}

fn hickory(server: SocketAddr, tcp: bool) -> Resolver<TokioRuntimeProvider> {
    let mut conn = if tcp {
        ConnectionConfig::tcp()
    } else {
        ConnectionConfig::udp()
    };
    conn.port = server.port();
    let ns = NameServerConfig::new(server.ip(), true, vec![conn]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(5);
    opts.ndots = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .expect("hickory resolver")
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_are_answered_locally_under_every_short_form() {
    let upstream = Dnsmasq::start(60);
    let mut proxy = Proxy::start(MESH, vec![upstream.addr], Arc::new(Fixed(upstream.addr))).await;
    for name in [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
        "reviews.default.default.svc.cluster.local",
        "api.example.com",
    ] {
        let want = if name.starts_with("api") {
            "198.18.0.9"
        } else {
            "198.18.0.7"
        };
        for tcp in ["+notcp", "+tcp"] {
            let out = dig_async(proxy.dns, &["+short", tcp, name, "A"]).await;
            assert_eq!(out.trim(), want, "{name} {tcp}");
        }
    }
    let out = dig_async(proxy.dns, &["reviews.default.svc.cluster.local", "AAAA"]).await;
    assert!(out.contains("fd00:198:18::7"), "{out}");
    assert_eq!(ttls(&out), vec![45], "the configured TTL: {out}");
    assert!(flags_of(&out).contains("aa"), "{out}");
    // The mesh owns the name: a type it has no records of is NODATA, not forwarded.
    let out = dig_async(proxy.dns, &["api.example.com", "AAAA"]).await;
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    // dnsmasq does not know the mesh's names: the answers above were the proxy's own.
    let direct = dig(upstream.addr, &["reviews.default.svc.cluster.local", "A"]);
    assert_ne!(status_of(&direct), "NOERROR", "{direct}");
    assert!(proxy.queries("udp", "local").await >= 8.0);
    assert!(proxy.queries("tcp", "local").await >= 6.0);
    assert_eq!(proxy.queries("udp", "forwarded").await, 0.0);

    // hickory's resolver, over UDP and over TCP, on both listeners.
    for server in [Some(proxy.dns), proxy.dns_v6].into_iter().flatten() {
        for tcp in [false, true] {
            let r = hickory(server, tcp);
            let ips: Vec<IpAddr> = r
                .lookup_ip("reviews.default.svc.cluster.local.")
                .await
                .expect("mesh name")
                .iter()
                .collect();
            assert!(ips.contains(&"198.18.0.7".parse().expect("ip")), "{ips:?}");
            assert!(
                ips.contains(&"fd00:198:18::7".parse().expect("ip")),
                "{ips:?}"
            );
            let ips: Vec<IpAddr> = r
                .lookup_ip("upstream.test.")
                .await
                .expect("forwarded name")
                .iter()
                .collect();
            assert_eq!(
                ips,
                vec!["198.18.5.5".parse::<IpAddr>().expect("ip")],
                "{server} tcp={tcp}"
            );
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_then_cached_for_their_ttl_only() {
    let upstream = Dnsmasq::start(2);
    let mut proxy = Proxy::start(MESH, vec![upstream.addr], Arc::new(Fixed(upstream.addr))).await;
    let out = dig_async(proxy.dns, &["upstream.test", "A"]).await;
    assert!(out.contains("198.18.5.5"), "{out}");
    assert_eq!(proxy.queries("udp", "forwarded").await, 1.0);
    let out = dig_async(proxy.dns, &["upstream.test", "A"]).await;
    assert!(out.contains("198.18.5.5"), "{out}");
    assert_eq!(proxy.queries("udp", "cached").await, 1.0);
    // The cached answer's TTL never exceeds what the upstream gave.
    assert!(
        out.contains("\t2\tIN\tA") || out.contains("\t1\tIN\tA") || out.contains("\t0\tIN\tA"),
        "{out}"
    );
    // Past the TTL the cache must not answer.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = dig_async(proxy.dns, &["upstream.test", "A"]).await;
    assert!(out.contains("198.18.5.5"), "{out}");
    assert_eq!(proxy.queries("udp", "forwarded").await, 2.0);
    // NXDOMAIN passes through.
    let out = dig_async(proxy.dns, &["nothing.invalid", "A"]).await;
    let direct = dig(upstream.addr, &["nothing.invalid", "A"]);
    assert_eq!(status_of(&out), status_of(&direct), "{out}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_is_passed_through_and_truncation_is_retried_over_tcp() {
    let upstream = Dnsmasq::start(60);
    let mut proxy = Proxy::start(MESH, vec![upstream.addr], Arc::new(Fixed(upstream.addr))).await;
    // dnsmasq's UDP answers stop at 1232 B: asked directly with a 4096 B buffer, big.test is
    // truncated; through the proxy, which retries over TCP, it arrives whole over UDP.
    let direct = dig(
        upstream.addr,
        &["+bufsize=4096", "+ignore", "big.test", "TXT"],
    );
    assert!(
        flags_of(&direct).contains("tc"),
        "the upstream truncates: {direct}"
    );
    let out = dig_async(proxy.dns, &["+bufsize=4096", "+ignore", "big.test", "TXT"]).await;
    assert!(!flags_of(&out).contains("tc"), "{out}");
    assert!(out.contains(&"h".repeat(200)), "all 8 strings: {out}");
    assert!(
        out.contains("EDNS: version: 0"),
        "EDNS in the answer: {out}"
    );
    // A client without EDNS gets TC (512 B), and the whole answer over TCP.
    let out = dig_async(proxy.dns, &["+noedns", "+ignore", "big.test", "TXT"]).await;
    assert!(flags_of(&out).contains("tc"), "{out}");
    assert!(
        !out.contains("EDNS: version"),
        "no OPT for a client without EDNS: {out}"
    );
    let out = dig_async(proxy.dns, &["+noedns", "+tcp", "big.test", "TXT"]).await;
    assert!(out.contains(&"h".repeat(200)), "{out}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_goes_to_the_original_destination_udp_to_the_configured_resolver() {
    let upstream = Dnsmasq::start(60);
    // The configured (resolv.conf) resolver is silent; TCP's original destination is dnsmasq.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let mut proxy = Proxy::start(MESH, vec![silent_addr], Arc::new(Fixed(upstream.addr))).await;
    let out = dig_async(proxy.dns, &["+tcp", "upstream.test", "A"]).await;
    assert!(out.contains("198.18.5.5"), "{out}");
    let start = Instant::now();
    // Another name: the TCP answer is cached.
    let out = dig_async(proxy.dns, &["+notcp", "both.test", "A"]).await;
    assert_eq!(status_of(&out), "SERVFAIL", "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        start.elapsed()
    );
    assert_eq!(proxy.queries("udp", "failed").await, 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_resolver_gives_servfail_in_bounded_time() {
    // One resolver refuses (nothing listens: ICMP port unreachable), one never answers.
    let refused = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let mut proxy = Proxy::start(MESH, vec![refused, silent_addr], Arc::new(NoOrigDst)).await;
    for tcp in ["+notcp", "+tcp"] {
        let start = Instant::now();
        let out = dig_async(proxy.dns, &[tcp, "upstream.test", "A"]).await;
        assert_eq!(status_of(&out), "SERVFAIL", "{tcp}: {out}");
        // upstream_timeout is 1 s.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{tcp}: {:?}",
            start.elapsed()
        );
    }
    // Mesh names do not need the resolver.
    let out = dig_async(proxy.dns, &["+short", "reviews", "A"]).await;
    assert_eq!(out.trim(), "198.18.0.7");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_formerr_or_nothing_and_break_nothing() {
    let upstream = Dnsmasq::start(60);
    let mut proxy = Proxy::start(MESH, vec![upstream.addr], Arc::new(NoOrigDst)).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.connect(proxy.dns).await.expect("connect");
    let mut buf = [0u8; 4096];
    // A header and garbage: FORMERR with the same id.
    let mut junk = vec![0xbe, 0xef, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 40]);
    sock.send(&junk).await.expect("send");
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("an answer")
        .expect("recv");
    assert_eq!(&buf[..2], &[0xbe, 0xef]);
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    assert!(n >= 12);
    // Too short for a header, a response, a name with a compression loop, a label past the end,
    // an empty datagram: none gets an answer, none stops the server.
    let loop_name = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
    let past_end = [0, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 60, b'a', b'b'];
    let response = [0, 3, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0];
    for bad in [&[1u8, 2, 3][..], &response, &[]] {
        sock.send(bad).await.expect("send");
    }
    for bad in [&loop_name[..], &past_end] {
        sock.send(bad).await.expect("send");
        // These have headers: FORMERR.
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("an answer")
            .expect("recv");
        assert_eq!(&buf[..2], &bad[..2]);
        assert_eq!(buf[3] & 0x0f, 1, "FORMERR for {bad:?} ({n} B)");
    }
    // Over TCP: a length prefix promising more than comes, then close.
    let mut s = TcpStream::connect(proxy.dns).await.expect("tcp");
    s.write_all(&[0x10, 0x00, 1, 2, 3]).await.expect("write");
    drop(s);
    // Still serving, both ways.
    assert_eq!(
        dig_async(proxy.dns, &["+short", "reviews", "A"])
            .await
            .trim(),
        "198.18.0.7"
    );
    assert_eq!(
        dig_async(proxy.dns, &["+short", "+tcp", "upstream.test", "A"])
            .await
            .trim(),
        "198.18.5.5"
    );
    assert!(proxy.queries("udp", "malformed").await >= 4.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_flood_is_bounded_and_the_proxy_recovers() {
    // Every forwarded query waits the full upstream timeout (1 s) on a silent resolver, so a
    // flood fills the in-flight bound; the excess must be dropped, not queued without end.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let mut proxy = Proxy::start(MESH, vec![silent_addr], Arc::new(NoOrigDst)).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut sent = 0u32;
    let start = Instant::now();
    // Paced so the proxy, not the kernel's receive buffer, is what overflows.
    while sent < 60_000 && start.elapsed() < Duration::from_millis(900) {
        if sent.is_multiple_of(32) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let mut q = vec![(sent >> 8) as u8, sent as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let label = format!("n{sent}");
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
        q.extend_from_slice(&[4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        if sock.send_to(&q, proxy.dns).await.is_ok() {
            sent += 1;
        }
    }
    let dropped = proxy.queries("udp", "dropped").await;
    let failed = proxy.queries("udp", "failed").await;
    assert!(dropped > 0.0, "{sent} sent, none dropped ({failed} failed)");
    // After the in-flight queries time out, the proxy answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = dig_async(proxy.dns, &["+short", "reviews", "A"]).await;
        if out.trim() == "198.18.0.7" {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = proxy.queries("udp", "failed").await;
    assert!(
        failed <= f64::from(sent) - dropped,
        "{failed} failed, {dropped} dropped of {sent}"
    );
    proxy.shutdown().await;
}
