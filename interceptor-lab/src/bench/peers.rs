//! The apps and sidecars of the compatibility matrix that this project did not write: nginx
//! from Debian with its common production settings (`sendfile on; tcp_nopush on`), haproxy
//! from Debian as a transparent TCP sidecar, and a small Python asyncio proxy with a third I/O
//! pattern. Each is configured in a scratch directory and started inside a pod by the rig.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// The server app of the HTTP workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum App {
    /// This project's test app (hyper): `/bytes/N` answers N bytes.
    Testapp,
    /// nginx (Debian `nginx-light`) with `sendfile on; tcp_nopush on; tcp_nodelay on`, serving
    /// files `/bytes/N` of N bytes.
    Nginx,
}

/// The sidecar proxy in both pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sidecar {
    /// This project's proxy (`interceptor proxy`).
    Interceptor,
    /// haproxy (Debian) in `mode tcp`, upstream = SO_ORIGINAL_DST, inbound from 127.0.0.6.
    Haproxy,
    /// A small Python asyncio transparent proxy (`asyncio_proxy.py`).
    Asyncio,
}

impl App {
    pub fn name(self) -> &'static str {
        match self {
            App::Testapp => "testapp",
            App::Nginx => "nginx",
        }
    }
}

impl Sidecar {
    pub fn name(self) -> &'static str {
        match self {
            Sidecar::Interceptor => "interceptor",
            Sidecar::Haproxy => "haproxy",
            Sidecar::Asyncio => "asyncio",
        }
    }
}

/// Debian's interpreter (package `python3`): readable by the proxy UID, unlike a per-user one
/// earlier on root's PATH.
pub const PYTHON: &str = "/usr/bin/python3";

/// UID and GID the third-party sidecars run as: the identity interception leaves alone.
pub const PROXY_ID: u32 = 1337;

/// Writes nginx's config and its `/bytes/N` files under `dir`; returns the config path.
pub fn nginx_config(dir: &Path, listen: SocketAddr, sizes: &[usize]) -> Result<PathBuf> {
    let www = dir.join("www/bytes");
    fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
    for &n in sizes {
        fs::write(www.join(n.to_string()), body(n))?;
    }
    let d = dir.display();
    let conf = format!(
        r"# Written by `interceptor bench`: nginx as users run it (sendfile + TCP_CORK).
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    server {{
        listen {listen} reuseport backlog=4096;
        root {d}/www;
        location / {{ }}
    }}
}}
"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    Ok(path)
}

/// The body nginx serves for `/bytes/N`: a position-dependent pattern (a prime period, so
/// it never lines up with page or message boundaries) that shows any lost, duplicated or
/// reordered byte.
pub fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// haproxy as an Istio-style transparent TCP sidecar (PEERS.md).
pub fn haproxy_config(dir: &Path, outbound_port: u16, inbound_port: u16) -> Result<PathBuf> {
    let conf = format!(
        r"# Written by `interceptor bench`: haproxy as a transparent TCP sidecar.
global
    uid {PROXY_ID}
    gid {PROXY_ID}
    # 2048 needs ~4100 descriptors: fits under the 8192 a test process may have set for itself
    # (4096 asked for 8210 and haproxy refused to start), and far above any benchmark's load.
    maxconn 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend outbound
    bind 127.0.0.1:{outbound_port}
    # A connection made to the sidecar itself (a readiness probe, a port scan) has no other
    # original destination: `server 0.0.0.0:0` would dial this port again, and each accept
    # dials again, until maxconn, and every later connection of the pod waits behind them.
    tcp-request connection reject if {{ dst_port {outbound_port} }} || {{ dst_port {inbound_port} }}
    default_backend original_dst
backend original_dst
    server s 0.0.0.0:0
frontend inbound
    bind 0.0.0.0:{inbound_port}
    tcp-request connection reject if {{ dst_port {outbound_port} }} || {{ dst_port {inbound_port} }}
    default_backend inbound_passthrough
backend inbound_passthrough
    source 127.0.0.6
    server s 0.0.0.0:0
"
    );
    let path = dir.join("haproxy.cfg");
    fs::write(&path, conf)?;
    Ok(path)
}

/// The asyncio proxy's script, written under `dir`.
pub fn asyncio_script(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("asyncio_proxy.py");
    fs::write(&path, include_str!("asyncio_proxy.py"))?;
    Ok(path)
}

/// dnsmasq as a pod's resolver (the DNS tests' and the DNS benchmark's): in the foreground, no
/// config file, resolv.conf or hosts, port 53 on the given addresses only, a 60 s TTL for the
/// names it is told (`--address=/NAME/IP`, added by the caller), quiet.
pub fn dnsmasq(listen: &[std::net::IpAddr]) -> std::process::Command {
    let mut cmd = std::process::Command::new("dnsmasq");
    cmd.args([
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--port=53",
        "--local-ttl=60",
    ])
    .args(listen.iter().map(|ip| format!("--listen-address={ip}")))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd
}
