//! `interceptor-lab bench-proxy` (what `cargo xtask bench proxy` runs): the sidecar proxy
//! against haproxy configured as the same sidecar, and against no proxy at all, on loopback.
//!
//! Rows: HTTP/1.1 keep-alive (16 connections, and one connection), gRPC unary with 16 streams
//! at once on one connection and on four (h2load), WebSocket echo (tokio-tungstenite), and
//! memory per idle h2 connection (the gRPC app's own too: the floor of hyper's h2 server).
//! Peers run interleaved, round after round, and the report shows medians, since these
//! machines are shared and noisy. Every run is bounded by a budget and a time limit. Results
//! go to `<out>/proxy-<timestamp>/` (JSON and Markdown).

mod configs;
mod grpc_load;
pub mod idle;
mod procs;
mod results;
mod ws_load;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use serde::Serialize;

use self::{
    configs::Apps,
    procs::{Proc, cpu_seconds, free_addr},
    results::{ProxyReport, Round},
};
use crate::loadgen::{self, LoadSpec, Percentiles};

/// `interceptor-lab bench-proxy` options.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct ProxyBenchArgs {
    /// Interleaved rounds (direct, interceptor, haproxy, again…); medians are shown.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Time limit of each measured run, seconds.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Warm-up before each measured run, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_seconds: f64,
    /// Request budget of each HTTP/1.1 run under load (the time limit may end it first).
    #[arg(long, default_value_t = 200_000)]
    pub requests: u64,
    /// Keep-alive connections of the HTTP/1.1 run under load.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Request budget of the one-connection HTTP/1.1 run.
    #[arg(long, default_value_t = 20_000)]
    pub latency_requests: u64,
    /// gRPC streams at once, spread over the connections of each gRPC row.
    #[arg(long, default_value_t = 16)]
    pub grpc_streams: usize,
    /// WebSocket connections of the echo row.
    #[arg(long, default_value_t = 16)]
    pub ws_connections: usize,
    /// WebSocket message size, bytes.
    #[arg(long, default_value_t = 64)]
    pub ws_message_bytes: usize,
    /// Message budget of each WebSocket run.
    #[arg(long, default_value_t = 400_000)]
    pub ws_messages: u64,
    /// Idle h2 connections opened to measure memory per connection.
    #[arg(long, default_value_t = 1000)]
    pub idle_connections: usize,
    /// Where `proxy-<timestamp>/` goes.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// A README whose `<!-- bench-proxy:start -->`…`<!-- bench-proxy:end -->` section gets the
    /// tables.
    #[arg(long)]
    pub readme: Option<PathBuf>,
    /// Skip haproxy (a machine without the Debian package).
    #[arg(long)]
    pub no_haproxy: bool,
    /// Only the idle-connection memory row (for tuning it).
    #[arg(long)]
    pub memory_only: bool,
}

/// One measured run: operations per second, latency, failures.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Requests, calls or messages per second.
    pub per_second: f64,
    pub latency_us: Percentiles,
    pub operations: u64,
    pub errors: u64,
    /// CPU the proxy process spent per operation, µs.
    pub proxy_cpu_us_per_op: Option<f64>,
}

/// What a row sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Workload {
    Http1Loaded,
    Http1Single,
    GrpcOneConnection,
    GrpcFourConnections,
    WebSocketEcho,
}

impl Workload {
    const ALL: [Self; 5] = [
        Self::Http1Loaded,
        Self::Http1Single,
        Self::GrpcOneConnection,
        Self::GrpcFourConnections,
        Self::WebSocketEcho,
    ];

    fn label(self, args: &ProxyBenchArgs) -> String {
        match self {
            Self::Http1Loaded => format!("HTTP/1.1 keep-alive, {} connections", args.concurrency),
            Self::Http1Single => "HTTP/1.1 keep-alive, 1 connection".to_owned(),
            Self::GrpcOneConnection => {
                format!("gRPC unary, {} streams on 1 connection", args.grpc_streams)
            }
            Self::GrpcFourConnections => {
                format!("gRPC unary, {} streams on 4 connections", args.grpc_streams)
            }
            Self::WebSocketEcho => format!(
                "WebSocket echo, {} connections, {} B messages",
                args.ws_connections, args.ws_message_bytes
            ),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Http1Loaded | Self::Http1Single => "req/s",
            Self::GrpcOneConnection | Self::GrpcFourConnections => "calls/s",
            Self::WebSocketEcho => "msgs/s",
        }
    }
}

/// A path the load goes through.
struct Peer {
    name: &'static str,
    /// HTTP/1.1 and WebSocket clients connect here.
    h1: SocketAddr,
    /// h2c (gRPC) clients connect here.
    h2: SocketAddr,
    /// WebSocket clients connect here.
    ws: SocketAddr,
    /// The proxy's process (none for direct).
    pid: Option<u32>,
}

pub fn run(args: &ProxyBenchArgs) -> Result<ProxyReport> {
    // This binary runs the apps and the proxy too.
    let lab = std::env::current_exe().context("finding the interceptor-lab binary")?;
    let scratch =
        std::env::temp_dir().join(format!("interceptor-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let _cleanup = Cleanup(scratch.clone());
    let mut report = ProxyReport::new(args);

    // The apps: separate processes, so the load generator (this process) does not share
    // their event loops.
    let apps = Apps {
        http: free_addr()?,
        grpc: free_addr()?,
        ws: free_addr()?,
    };
    let mut app_procs = Vec::new();
    for (name, sub, addr) in [
        ("HTTP app", "http-server", apps.http),
        ("gRPC app", "grpc-echo-server", apps.grpc),
        ("WebSocket app", "ws-echo-server", apps.ws),
    ] {
        let mut p = Proc::spawn(
            name,
            Command::new(&lab)
                .args(["--log-level", "warn", "testapp", sub, "--listen"])
                .arg(addr.to_string()),
        )?;
        p.wait_listening(addr)?;
        app_procs.push(p);
    }

    let grpc_app_pid = app_procs[1].pid();
    // The same echo on the h2 crate alone, for the memory rows only: the floor of an h2 server
    // without hyper.
    let h2_app_addr = free_addr()?;
    let mut h2_app = Proc::spawn(
        "h2 app",
        Command::new(&lab)
            .args([
                "--log-level",
                "warn",
                "testapp",
                "h2-echo-server",
                "--listen",
            ])
            .arg(h2_app_addr.to_string()),
    )?;
    h2_app.wait_listening(h2_app_addr)?;
    let h2_app_pid = h2_app.pid();
    app_procs.push(h2_app);
    let config = scratch.join("interceptor.yaml");
    std::fs::write(&config, configs::interceptor(apps))?;
    let ports: Vec<SocketAddr> = (0..5).map(|_| free_addr()).collect::<Result<_>>()?;
    let mut icpt = Proc::spawn(
        "interceptor proxy",
        Command::new(&lab)
            .args([
                "--log-level",
                "warn",
                "proxy",
                "--fixed-dst",
                configs::FIXED_DST,
            ])
            .args(["--no-drop-privileges", "--config"])
            .arg(&config)
            .args(["--outbound", &ports[0].to_string(), "--outbound-v6", "none"])
            .args(["--inbound", &ports[1].to_string()])
            .args(["--metrics", &ports[2].to_string()])
            .args(["--health", &ports[3].to_string()])
            .args(["--admin", &ports[4].to_string()]),
    )?;
    icpt.wait_listening(ports[0])?;

    let mut peers = vec![
        Peer {
            name: "direct (no proxy)",
            h1: apps.http,
            h2: apps.grpc,
            ws: apps.ws,
            pid: None,
        },
        Peer {
            name: "interceptor proxy",
            h1: ports[0],
            h2: ports[0],
            ws: ports[0],
            pid: Some(icpt.pid()),
        },
    ];
    let mut haproxy = None;
    if !args.no_haproxy {
        let (h1, h2) = (free_addr()?, free_addr()?);
        let cfg = scratch.join("haproxy.cfg");
        std::fs::write(&cfg, configs::haproxy(h1, h2, apps))?;
        report.haproxy_version = Command::new("haproxy")
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            });
        let mut p = Proc::spawn(
            "haproxy",
            Command::new("haproxy").args(["-db", "-f"]).arg(&cfg),
        )?;
        p.wait_listening(h1)?;
        p.wait_listening(h2)?;
        peers.push(Peer {
            name: "haproxy",
            h1,
            h2,
            ws: h1,
            pid: Some(p.pid()),
        });
        haproxy = Some(p);
    }

    let request_file = grpc_load::request_file(&scratch)?;
    let request = Bytes::from(std::fs::read(&request_file)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let rounds = if args.memory_only { 0 } else { args.rounds.max(1) };
        for round in 1..=rounds {
            for peer in &peers {
                for workload in Workload::ALL {
                    // The time-out is the least of it: a proxy that breaks a protocol is a
                    // result, reported as errors, not a reason to stop.
                    let measured =
                        measure(peer, workload, args, &request_file, &scratch).await;
                    let measured = match measured {
                        Ok(m) => m,
                        Err(err) => {
                            eprintln!("round {round}: {}: {:?}: {err:#}", peer.name, workload);
                            report.failures.push(format!(
                                "round {round}, {}, {}: {err:#}",
                                peer.name,
                                workload.label(args)
                            ));
                            continue;
                        }
                    };
                    eprintln!(
                        "round {round}: {:<18} {:<45} {:>9.0} {}  p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}",
                        peer.name,
                        workload.label(args),
                        measured.per_second,
                        workload.unit(),
                        measured.latency_us.p50,
                        measured.latency_us.p99,
                        measured.errors
                    );
                    report.rounds.push(Round {
                        round,
                        peer: peer.name.to_owned(),
                        workload,
                        measured,
                    });
                }
            }
        }
        // The gRPC app too: hyper's h2 server with the same allocator and nothing else, the
        // floor a proxy built on it starts from.
        let grpc_app = ("the gRPC app itself (hyper's h2 server)", apps.grpc, grpc_app_pid);
        let measured = peers
            .iter()
            .filter_map(|p| Some((p.name, p.h2, p.pid?)))
            .chain(std::iter::once(grpc_app))
            .chain(std::iter::once((
                "the same echo on the h2 crate alone (no hyper)",
                h2_app_addr,
                h2_app_pid,
            )));
        for (name, addr, pid) in measured {
            eprintln!("{name}: memory per idle h2 connection");
            match idle::bytes_per_connection(addr, pid, args.idle_connections, &request).await {
                Ok(bytes) => report.idle_h2.push((name.to_owned(), bytes)),
                Err(err) => report
                    .failures
                    .push(format!("{name}, idle h2 connections: {err:#}")),
            }
        }
    });
    drop(peers);
    drop(haproxy);
    drop(icpt);
    drop(app_procs);
    report.finish(args);
    Ok(report)
}

async fn measure(
    peer: &Peer,
    workload: Workload,
    args: &ProxyBenchArgs,
    request_file: &Path,
    scratch: &Path,
) -> Result<Measured> {
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let limit = Duration::from_secs_f64(args.seconds);
    let http = |concurrency: usize, requests: u64, time: Duration| {
        LoadSpec::new(
            peer.h1,
            configs::HTTP_HOST,
            "/",
            concurrency,
            requests,
            time,
            loadgen::Mode::KeepAlive,
        )
    };
    let grpc = |connections: usize| grpc_load::GrpcLoad {
        target: peer.h2,
        connections,
        streams: (args.grpc_streams / connections).max(1),
        seconds: args.seconds,
        warmup_seconds: args.warmup_seconds,
        request: request_file,
        scratch,
    };
    let ws = |messages: u64, seconds: f64| ws_load::WsLoad {
        target: peer.ws,
        connections: args.ws_connections,
        message_bytes: args.ws_message_bytes,
        messages,
        seconds,
    };
    // Warm-ups that the measuring tool does not do itself.
    match workload {
        Workload::Http1Loaded | Workload::Http1Single => {
            let c = if workload == Workload::Http1Loaded {
                args.concurrency
            } else {
                1
            };
            loadgen::run(http(c, u64::MAX / 4, warmup)).await;
        }
        Workload::WebSocketEcho => {
            ws_load::run(&ws(u64::MAX / 4, args.warmup_seconds)).await?;
        }
        Workload::GrpcOneConnection | Workload::GrpcFourConnections => {}
    }
    let cpu_before = peer.pid.map(cpu_seconds).transpose()?;
    let mut measured = match workload {
        Workload::Http1Loaded | Workload::Http1Single => {
            let (c, n) = if workload == Workload::Http1Loaded {
                (args.concurrency, args.requests)
            } else {
                (1, args.latency_requests)
            };
            let r = loadgen::run(http(c, n, limit)).await;
            if r.responses == 0 {
                bail!("no responses: {:?}", r.error_kinds);
            }
            Measured {
                per_second: r.requests_per_second,
                latency_us: r.latency_us,
                operations: r.ok,
                errors: r.errors + (r.responses - r.ok),
                proxy_cpu_us_per_op: None,
            }
        }
        Workload::GrpcOneConnection => grpc_load::run(&grpc(1)).await?,
        Workload::GrpcFourConnections => grpc_load::run(&grpc(4)).await?,
        Workload::WebSocketEcho => ws_load::run(&ws(args.ws_messages, args.seconds)).await?,
    };
    let cpu_after = peer.pid.map(cpu_seconds).transpose()?;
    // h2load warms up inside its own run, uncounted: its calls are estimated at the
    // measured rate.
    let operations = match workload {
        Workload::GrpcOneConnection | Workload::GrpcFourConnections => {
            measured.per_second * (args.seconds + args.warmup_seconds)
        }
        _ => measured.operations as f64,
    };
    if let (Some(before), Some(after)) = (cpu_before, cpu_after)
        && operations > 0.0
    {
        measured.proxy_cpu_us_per_op = Some((after - before) * 1e6 / operations);
    }
    Ok(measured)
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
