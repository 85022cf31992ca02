//! `cargo xtask bench <what>`: benchmarks, each run by `interceptor-lab` from a release build,
//! each writing its results under `bench/results/` with the exact command that produced them.
//!
//! `proxy`: the sidecar proxy vs haproxy (Debian, same sidecar config) vs no proxy on loopback
//! — HTTP/1.1, gRPC unary (h2load), WebSocket echo, memory per idle h2 connection; the logic
//! is `interceptor_lab::bench::proxy`. `datapath`: see `bench_datapath.rs`. `dns` and `scale`
//! (thousands of pods): see `bench_lab.rs`.

#![allow(
    unsafe_code,
    reason = "getrlimit/setrlimit: the idle-connection rows need more descriptors"
)]

use std::process::Command;

use anyhow::{Result, bail};
use xtask::{exec, is_root, step, workspace_root};

/// `cargo xtask bench [datapath|proxy]`: the datapath comparison when nothing is named.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: Option<Bench>,
}

#[derive(clap::Subcommand)]
pub(crate) enum Bench {
    /// Interception modes side by side on real pods: direct, iptables, ebpf, ebpf without
    /// sk_msg (the default).
    Datapath(crate::bench_datapath::DatapathOptions),
    /// The L7 sidecar proxy vs haproxy vs no proxy (HTTP/1.1, gRPC, WebSocket, idle h2
    /// memory on loopback).
    Proxy(ProxyOptions),
    /// DNS capture (eBPF, iptables) to the sidecar's DNS proxy vs the resolver asked directly.
    Dns(crate::bench_lab::LabBenchOptions),
    /// Thousands of pods on the node: connect and request latency per pod count, map
    /// occupancy and kernel memory, 10 000 concurrent connections, agent pass time and memory.
    Scale(crate::bench_lab::LabBenchOptions),
}

#[derive(clap::Args, Clone)]
pub(crate) struct ProxyOptions {
    /// Leave README.md alone.
    #[arg(long)]
    no_readme: bool,
    /// Passed to `interceptor-lab bench-proxy` (e.g. `-- --rounds 5 --seconds 8`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub(crate) fn run(args: &BenchArgs, command_line: &str) -> Result<()> {
    match &args.what {
        None => crate::bench_datapath::run(&Default::default(), command_line),
        Some(Bench::Datapath(opts)) => crate::bench_datapath::run(opts, command_line),
        Some(Bench::Proxy(opts)) => proxy(opts, command_line),
        Some(Bench::Dns(opts)) => crate::bench_lab::run(&crate::bench_lab::DNS, opts, command_line),
        // bench-scale raises its own open-file limit (it runs standalone too).
        Some(Bench::Scale(opts)) => {
            crate::bench_lab::run(&crate::bench_lab::SCALE, opts, command_line)
        }
    }
}

/// Raises the open-file limit (inherited by the benchmark and its children) for the
/// idle-connection rows.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn proxy(opts: &ProxyOptions, command_line: &str) -> Result<()> {
    let no_haproxy = opts.args.iter().any(|a| a == "--no-haproxy");
    let mut needed = vec!["nghttp2-client"];
    if !no_haproxy {
        needed.push("haproxy");
    }
    let missing = crate::setup::missing_packages(&needed)?;
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?} (h2load, haproxy): run as root (installs \
                 them) or `cargo xtask setup`"
            );
        }
        crate::setup::install_packages(&missing)?;
    }
    let bin = xtask::build_release_lab()?;
    raise_nofile();
    let root = workspace_root();
    step(&format!(
        "{} bench-proxy (a few minutes; every run is bounded)",
        bin.display()
    ));
    let mut cmd = Command::new(&bin);
    cmd.args(["bench-proxy", "--out", "bench/results"]);
    if !opts.no_readme {
        cmd.args(["--readme", "README.md"]);
    }
    exec(
        cmd.args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )
}
