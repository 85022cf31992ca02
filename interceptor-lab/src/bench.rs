//! `interceptor bench`: what the eBPF datapath saves over istio-iptables, on the same proxy and
//! the same traffic, measured in one run.
//!
//! Topology per mode (see `rig`): client pod → its sidecar → server pod → its sidecar → server
//! app, on real network namespaces and veths; this binary's proxy is the sidecar in every mode.
//! Workloads: HTTP/1.1 keep-alive at fixed concurrency levels and connection-per-request (from a
//! load generator running as a process in the client pod), and a byte stream over the app↔proxy
//! hop alone (sk_msg redirect vs loopback TCP, message sizes from 1 KiB to 1 MiB). Modes run
//! interleaved, round after round, since these machines are noisy; CPU comes from the pods'
//! cgroups (`cpu.stat`), so it includes the app, the sidecars and the kernel work done for them.

mod report;
mod rig;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub use self::{
    report::Report,
    rig::{Mode, Rig, Workload},
};
use crate::{lab::LabPod, loadgen, testapp::stream::StreamResult};

/// `interceptor bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Modes to compare, run interleaved in this order each round.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    pub modes: Vec<Mode>,
    /// Rounds (every mode once per round); min/median/max are over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Keep-alive concurrency levels.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    pub concurrency: Vec<usize>,
    /// Concurrency of the connection-per-request workload (0 skips it).
    #[arg(long, default_value_t = 16)]
    pub connect_concurrency: usize,
    /// Requests per HTTP run (the time limit may end a run first).
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Time limit per HTTP run, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub run_seconds: f64,
    /// Message sizes of the app↔proxy stream, bytes (empty skips it).
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 16384, 65536, 262144, 1048576])]
    pub stream_sizes: Vec<usize>,
    /// Bytes per stream run.
    #[arg(long, default_value_t = 256 << 20)]
    pub stream_bytes: u64,
    /// Extra arguments for the agent of the eBPF modes (e.g. `--agent-arg=--stream-streak=32`),
    /// to compare datapath settings.
    #[arg(long, allow_hyphen_values = true)]
    pub agent_arg: Vec<String>,
    /// Skip the HTTP workloads.
    #[arg(long)]
    pub no_http: bool,
    /// Skip the app↔proxy stream.
    #[arg(long)]
    pub no_stream: bool,
    /// Where results go (JSON, Markdown, SVG).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One HTTP run of one mode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HttpRun {
    pub mode: Mode,
    /// e.g. `keep-alive c=16`.
    pub workload: String,
    pub round: u32,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU of both pods (app, sidecars, load generator, kernel work on their behalf).
    pub cpu_seconds: f64,
    pub cpu_seconds_per_10k: f64,
}

/// One stream run over the app↔proxy hop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRun {
    pub mode: Mode,
    pub message_size: usize,
    pub round: u32,
    pub gib_per_second: f64,
    pub cpu_seconds_per_gib: f64,
}

pub fn run(args: &BenchArgs) -> Result<Report> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the benchmark builds pods (network namespaces, cgroups) and loads eBPF: run as root"
        );
    }
    if args.rounds == 0 || args.modes.is_empty() {
        bail!("nothing to run: give at least one mode and one round");
    }
    let started = Instant::now();
    let mut report = Report::new(args);
    let workloads = http_workloads(args);
    let total = args.rounds as usize * args.modes.len();
    let mut step = 0;
    for round in 1..=args.rounds {
        for &mode in &args.modes {
            step += 1;
            eprintln!(
                "[{step}/{total}] round {round}, {}: HTTP ({:.0}s so far)",
                mode.name(),
                started.elapsed().as_secs_f64()
            );
            if !workloads.is_empty() {
                let rig = Rig::new(mode, Workload::Http, "bench", &args.agent_arg)?;
                warm_up(&rig)?;
                for (name, load_mode, concurrency) in &workloads {
                    let run = http_run(&rig, args, name, *load_mode, *concurrency, round)?;
                    eprintln!(
                        "    {:<22} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  {:.3} CPU-s/10k{}",
                        run.workload,
                        run.requests_per_second,
                        run.p50_us,
                        run.p99_us,
                        run.cpu_seconds_per_10k,
                        if run.errors > 0 {
                            format!("  ({} errors)", run.errors)
                        } else {
                            String::new()
                        }
                    );
                    report.http.push(run);
                }
            }
            if !args.no_stream && !args.stream_sizes.is_empty() {
                let rig = Rig::new(mode, Workload::HopSink, "bench", &args.agent_arg)?;
                for &size in &args.stream_sizes {
                    let run = stream_run(&rig, args, size, round)?;
                    eprintln!(
                        "    stream {:>8} B writes  {:>6.2} GiB/s  {:.3} CPU-s/GiB",
                        size, run.gib_per_second, run.cpu_seconds_per_gib
                    );
                    report.streams.push(run);
                }
            }
        }
    }
    report.finish(started.elapsed());
    Ok(report)
}

fn http_workloads(args: &BenchArgs) -> Vec<(String, loadgen::Mode, usize)> {
    if args.no_http {
        return Vec::new();
    }
    let mut w: Vec<(String, loadgen::Mode, usize)> = args
        .concurrency
        .iter()
        .map(|&c| (format!("keep-alive c={c}"), loadgen::Mode::KeepAlive, c))
        .collect();
    if args.connect_concurrency > 0 {
        w.push((
            format!("conn-per-request c={}", args.connect_concurrency),
            loadgen::Mode::ConnectionPerRequest,
            args.connect_concurrency,
        ));
    }
    w
}

/// Opens connections, fills caches and pools before anything is measured.
fn warm_up(rig: &Rig) -> Result<()> {
    let result = load(rig, loadgen::Mode::KeepAlive, 16, 2_000, 10.0)?;
    if result.ok == 0 {
        bail!(
            "{}: no request succeeded during warm-up ({:?}); the topology is broken",
            rig.mode.name(),
            result.error_kinds
        );
    }
    Ok(())
}

fn http_run(
    rig: &Rig,
    args: &BenchArgs,
    name: &str,
    mode: loadgen::Mode,
    concurrency: usize,
    round: u32,
) -> Result<HttpRun> {
    let cpu_before = cpu_usec(&[&rig.client, &rig.server])?;
    let result = load(rig, mode, concurrency, args.requests, args.run_seconds)?;
    let cpu = (cpu_usec(&[&rig.client, &rig.server])? - cpu_before) as f64 / 1e6;
    Ok(HttpRun {
        mode: rig.mode,
        workload: name.to_owned(),
        round,
        requests: result.responses,
        errors: result.errors,
        requests_per_second: result.requests_per_second,
        p50_us: result.latency_us.p50,
        p90_us: result.latency_us.p90,
        p99_us: result.latency_us.p99,
        p999_us: result.latency_us.p999,
        cpu_seconds: cpu,
        cpu_seconds_per_10k: if result.responses > 0 {
            cpu * 10_000.0 / result.responses as f64
        } else {
            0.0
        },
    })
}

/// The part of `loadgen::LoadResult` the benchmark reads back from the load generator.
#[derive(Debug, Deserialize)]
struct LoadOutcome {
    responses: u64,
    ok: u64,
    errors: u64,
    #[serde(default)]
    error_kinds: std::collections::BTreeMap<String, u64>,
    requests_per_second: f64,
    latency_us: Latency,
}

#[derive(Debug, Deserialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
}

/// Runs the load generator as a process in the client pod (its CPU counts with the pod's).
fn load(
    rig: &Rig,
    mode: loadgen::Mode,
    concurrency: usize,
    requests: u64,
    seconds: f64,
) -> Result<LoadOutcome> {
    let out = run_in_pod(
        rig,
        &rig.client,
        &[
            "testapp",
            "load",
            "--target",
            &rig.app_addr().to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--requests",
            &requests.to_string(),
            "--time-limit",
            &seconds.to_string(),
            "--mode",
            match mode {
                loadgen::Mode::KeepAlive => "keep-alive",
                loadgen::Mode::ConnectionPerRequest => "connection-per-request",
            },
        ],
        Duration::from_secs_f64(seconds + 30.0),
    )?;
    serde_json::from_str(&out).context("reading the load generator's result")
}

fn stream_run(rig: &Rig, args: &BenchArgs, size: usize, round: u32) -> Result<StreamRun> {
    let cpu_before = cpu_usec(&[&rig.client])?;
    let out = run_in_pod(
        rig,
        &rig.client,
        &[
            "testapp",
            "stream",
            "--to",
            &rig.stream_target().to_string(),
            "--message-size",
            &size.to_string(),
            "--bytes",
            &args.stream_bytes.to_string(),
            "--time-limit",
            "10",
        ],
        Duration::from_secs(60),
    )?;
    let cpu = (cpu_usec(&[&rig.client])? - cpu_before) as f64 / 1e6;
    let result: StreamResult =
        serde_json::from_str(&out).context("reading the stream writer's result")?;
    let gib = result.bytes as f64 / f64::from(1u32 << 30);
    Ok(StreamRun {
        mode: rig.mode,
        message_size: size,
        round,
        gib_per_second: result.gib_per_second,
        cpu_seconds_per_gib: if gib > 0.0 { cpu / gib } else { 0.0 },
    })
}

/// Runs `interceptor-lab ARGS` inside `pod` (network namespace and cgroup) and returns its stdout;
/// killed after `limit`.
fn run_in_pod(rig: &Rig, pod: &LabPod, args: &[&str], limit: Duration) -> Result<String> {
    let mut child = pod
        .spawn(
            Command::new(rig.lab_exe())
                .args(["--log-level", "warn"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .with_context(|| format!("starting `{}` in {}", args.join(" "), pod.name))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` in {} ran past {limit:?}", args.join(" "), pod.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` in {} failed ({}): {}",
            args.join(" "),
            pod.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cpu_usec(pods: &[&LabPod]) -> Result<u64> {
    let mut total = 0;
    for pod in pods {
        total += pod.cpu_usec().with_context(|| {
            format!(
                "no cpu.stat for pod {}: the benchmark needs cgroup v2 with the cpu controller",
                pod.name
            )
        })?;
    }
    Ok(total)
}
