//! `interceptor-lab`: the demo, the datapath benchmark, the test apps the end-to-end suite and the
//! benchmarks run inside pods, and the sidecar with a fixed original destination (for the proxy
//! benchmark). Not shipped: the product binary is `interceptor`.

#![allow(unsafe_code, reason = "set_var before any thread exists")]

use std::{io::IsTerminal as _, net::SocketAddr, process::ExitCode, sync::Arc};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use interceptor::{
    cli::{LogFormat, ProxyArgs, secs},
    telemetry,
};
use interceptor_lab::{bench, demo, fixed_dst::FixedDst, loadgen, testapp};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "interceptor-lab",
    version,
    about = "Demo, benchmarks and test apps for interceptor"
)]
struct Cli {
    /// Log level (also RUST_LOG, which wins when set).
    #[arg(long, global = true, env = "INTERCEPTOR_LOG")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build two pods on real network namespaces and show a request crossing both sidecars.
    Demo(demo::DemoArgs),
    /// Compare interception modes (direct, iptables, ebpf, ebpf without sk_msg) on real pods:
    /// requests/s, latency percentiles, CPU per request, app↔proxy stream throughput.
    Bench(bench::BenchArgs),
    /// The sidecar's DNS proxy behind DNS capture (eBPF and iptables) vs the resolver asked
    /// directly: queries/s, p50/p99 for a cached, a locally answered and a forwarded name.
    DnsBench(bench::dns::DnsBenchArgs),
    /// The sidecar proxy vs haproxy vs no proxy on loopback: HTTP/1.1, gRPC (h2load),
    /// WebSocket echo, memory per idle h2 connection (what `cargo xtask bench proxy` runs).
    BenchProxy(bench::proxy::ProxyBenchArgs),
    /// The datapath and the agent with thousands of pods enabled: latency, map occupancy,
    /// 10 000 concurrent connections, agent memory (what `cargo xtask bench scale` runs).
    BenchScale(bench::scale::ScaleArgs),
    /// connect() latency from the client pod under pinning / agent-stopped conditions, with
    /// and without thousands of filler namespaces (enabled or not): the scale benchmark's
    /// 16-vs-33 µs connect() rounds.
    BenchConnect(bench::scale::connectlat::ConnectLatArgs),
    /// Filler pods (as `bench-scale` enables them) on a running agent's datapath, held until
    /// stdin closes: for profiling the agent and `pod` commands at node scale by hand.
    ScaleFillers(bench::scale::FillerArgs),
    /// Small applications the demo, the tests and the benchmarks run inside pods.
    #[command(subcommand)]
    Testapp(TestappCommand),
    /// The product's sidecar proxy, answering every original destination with --fixed-dst
    /// (the proxy benchmark: no interception, so no SO_ORIGINAL_DST to ask).
    Proxy {
        #[arg(long)]
        fixed_dst: SocketAddr,
        #[command(flatten)]
        args: Box<ProxyArgs>,
    },
}

#[derive(Debug, Subcommand)]
enum TestappCommand {
    /// HTTP server answering who called it.
    HttpServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "app")]
        name: String,
    },
    /// HTTP/1.1 load against one address (the benchmark's client); prints a JSON result.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "localhost")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Request budget (all connections together).
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Seconds; the run stops then even with requests left.
        #[arg(long, default_value_t = 10.0)]
        time_limit: f64,
        #[arg(long, value_enum, default_value_t = loadgen::Mode::KeepAlive)]
        mode: loadgen::Mode,
    },
    /// gRPC server (h2c) whose every unary method echoes its message.
    GrpcEchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The same gRPC echo on the h2 crate directly (no hyper, no tonic).
    H2EchoServer {
        #[arg(long)]
        listen: SocketAddr,
        /// A connection's streams on its own task, not a task each.
        #[arg(long)]
        inline: bool,
    },
    /// The same echo on hyper's HTTP/2 server without tonic.
    HyperEchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// WebSocket server that echoes every message.
    WsEchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Reads and discards every connection's bytes.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Writes a byte budget in fixed-size messages to an address; prints the result as JSON.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        message_size: usize,
        #[arg(long, default_value_t = 256 << 20)]
        bytes: u64,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        time_limit: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and the benchmark narrate on their own: routine info lines (theirs and their
    // children's, which read INTERCEPTOR_LOG) would bury that, unless a level was asked for.
    let narrated = matches!(
        cli.command,
        Command::Demo(_)
            | Command::Bench(_)
            | Command::DnsBench(_)
            | Command::BenchProxy(_)
            | Command::BenchScale(_)
            | Command::BenchConnect(_)
    );
    let level = match (&cli.log_level, narrated) {
        (Some(level), _) => level.clone(),
        (None, true) => {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::set_var("INTERCEPTOR_LOG", "warn") };
            "warn".into()
        }
        (None, false) => "info".into(),
    };
    telemetry::init(&level, LogFormat::Text);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(args) => {
            let color = std::io::stdout().is_terminal();
            runtime()?.block_on(demo::run(args, color))
        }
        Command::Bench(args) => {
            let report = bench::run(&args)?;
            let paths = report.write(&args.out)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.markdown());
            }
            for path in paths {
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::DnsBench(args) => {
            let report = bench::dns::run(&args)?;
            let dir = report.write(&args.out)?;
            println!("{}", report.markdown());
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        Command::BenchProxy(args) => {
            let report = bench::proxy::run(&args)?;
            let dir = report.write(&args.out)?;
            println!("{}", report.markdown(&dir));
            if let Some(readme) = &args.readme {
                report.update_readme(readme, &dir)?;
                eprintln!("updated {}", readme.display());
            }
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        Command::BenchScale(args) => {
            let report = bench::scale::run(&args)?;
            let dir = report.write(&args.out)?;
            println!("{}", report.markdown());
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        Command::BenchConnect(args) => {
            let report = bench::scale::connectlat::run(&args)?;
            let dir = report.write(&args.out)?;
            println!("{}", report.markdown());
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        Command::ScaleFillers(args) => bench::scale::hold_fillers(&args),
        Command::Testapp(cmd) => testapp_command(cmd),
        Command::Proxy { fixed_dst, args } => {
            interceptor::commands::proxy::run_with(*args, Some(Arc::new(FixedDst(fixed_dst))))
        }
    }
}

fn testapp_command(cmd: TestappCommand) -> Result<()> {
    match cmd {
        TestappCommand::HttpServer { listen, name } => {
            runtime()?.block_on(testapp::http_server(listen, name))?;
        }
        TestappCommand::Load {
            target,
            host,
            path,
            concurrency,
            requests,
            time_limit,
            mode,
        } => {
            let spec = loadgen::LoadSpec::new(
                target,
                &host,
                &path,
                concurrency,
                requests,
                secs(time_limit),
                mode,
            );
            let result = runtime()?.block_on(loadgen::run(spec));
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        TestappCommand::GrpcEchoServer { listen } => {
            runtime()?.block_on(testapp::grpc_echo::grpc_echo_server(listen))?;
        }
        TestappCommand::H2EchoServer { listen, inline } => {
            runtime()?.block_on(testapp::h2_echo::h2_echo_server(listen, inline))?;
        }
        TestappCommand::HyperEchoServer { listen } => {
            runtime()?.block_on(testapp::h2_echo::hyper_echo_server(listen))?;
        }
        TestappCommand::WsEchoServer { listen } => {
            runtime()?.block_on(testapp::ws_echo::ws_echo_server(listen))?;
        }
        TestappCommand::Sink { listen } => {
            runtime()?.block_on(testapp::stream::sink(listen))?;
        }
        TestappCommand::Stream {
            to,
            message_size,
            bytes,
            time_limit,
        } => {
            let result = runtime()?.block_on(testapp::stream::stream(
                to,
                message_size,
                bytes,
                secs(time_limit),
            ))?;
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}
