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

pub mod dns;
pub mod peers;
pub mod proxy;
mod report;
mod rig;
pub mod scale;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub use self::{
    peers::{App, Sidecar},
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
    /// Server apps of the HTTP workloads (each with each sidecar).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [App::Testapp])]
    pub apps: Vec<App>,
    /// Sidecar proxies of the HTTP workloads (the same one in both pods).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Sidecar::Interceptor])]
    pub sidecars: Vec<Sidecar>,
    /// Response sizes of the HTTP workloads, bytes (`GET /bytes/N`).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize])]
    pub response_sizes: Vec<usize>,
    /// Load generator of the HTTP workloads.
    #[arg(long, value_enum, default_value_t = LoadGenerator::Testapp)]
    pub load_generator: LoadGenerator,
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

/// Who sends the HTTP requests from the client pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadGenerator {
    /// This binary's load generator (hyper).
    Testapp,
    /// wrk from Debian, as users measure (its p99.9 is reported as its p99).
    Wrk,
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
    let combos: Vec<(App, Sidecar)> = args
        .apps
        .iter()
        .flat_map(|&app| args.sidecars.iter().map(move |&sidecar| (app, sidecar)))
        .collect();
    for round in 1..=args.rounds {
        for &mode in &args.modes {
            step += 1;
            eprintln!(
                "[{step}/{total}] round {round}, {}: HTTP ({:.0}s so far)",
                mode.name(),
                started.elapsed().as_secs_f64()
            );
            for &(app, sidecar) in if workloads.is_empty() {
                &[][..]
            } else {
                &combos[..]
            } {
                let topology = Workload::Http {
                    app,
                    sidecar,
                    sizes: &args.response_sizes,
                };
                let rig = Rig::new(mode, topology, "bench", &args.agent_arg)?;
                warm_up(&rig, args.response_sizes.first().copied().unwrap_or(64))?;
                for &size in &args.response_sizes {
                    for (name, load_mode, concurrency) in &workloads {
                        let name = format!(
                            "{}+{} {} {name}",
                            app.name(),
                            sidecar.name(),
                            report::human_size(size)
                        );
                        let run =
                            http_run(&rig, args, &name, size, *load_mode, *concurrency, round)?;
                        eprintln!(
                            "    {:<44} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  {:.3} CPU-s/10k{}",
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
                if matches!(mode, Mode::Ebpf | Mode::EbpfAlways | Mode::EbpfAdaptive) {
                    eprintln!("    counters: {}", rig.counter_summary());
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
fn warm_up(rig: &Rig, size: usize) -> Result<()> {
    let result = load(
        rig,
        LoadGenerator::Testapp,
        size,
        loadgen::Mode::KeepAlive,
        16,
        2_000,
        10.0,
    )?;
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
    size: usize,
    mode: loadgen::Mode,
    concurrency: usize,
    round: u32,
) -> Result<HttpRun> {
    let cpu_before = cpu_usec(&[&rig.client, &rig.server])?;
    let result = load(
        rig,
        args.load_generator,
        size,
        mode,
        concurrency,
        args.requests,
        args.run_seconds,
    )?;
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
    generator: LoadGenerator,
    size: usize,
    mode: loadgen::Mode,
    concurrency: usize,
    requests: u64,
    seconds: f64,
) -> Result<LoadOutcome> {
    if generator == LoadGenerator::Wrk {
        return wrk(rig, size, mode, concurrency, seconds);
    }
    let out = run_in_pod(
        rig,
        &rig.client,
        &[
            "testapp",
            "load",
            "--target",
            &rig.app_addr().to_string(),
            "--path",
            &format!("/bytes/{size}"),
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

/// wrk in the client pod; its text report parsed into a `LoadOutcome`.
fn wrk(
    rig: &Rig,
    size: usize,
    mode: loadgen::Mode,
    concurrency: usize,
    seconds: f64,
) -> Result<LoadOutcome> {
    let threads = concurrency.clamp(1, 2).to_string();
    let url = format!("http://{}/bytes/{size}", rig.app_addr());
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &threads, "-c", &concurrency.max(1).to_string()])
        .args(["-d", &format!("{}s", seconds.ceil().max(1.0))])
        .args(["--timeout", "10s", "--latency"]);
    if mode == loadgen::Mode::ConnectionPerRequest {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(&url);
    let out = run_command_in_pod(
        &rig.client,
        &mut cmd,
        Duration::from_secs_f64(seconds + 30.0),
    )?;
    parse_wrk(&out).with_context(|| format!("reading wrk's report:\n{out}"))
}

/// The numbers of wrk's `--latency` report.
fn parse_wrk(text: &str) -> Result<LoadOutcome> {
    let mut out = LoadOutcome {
        responses: 0,
        ok: 0,
        errors: 0,
        error_kinds: Default::default(),
        requests_per_second: 0.0,
        latency_us: Latency {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
        },
    };
    let duration_us = |v: &str| -> Option<f64> {
        let (num, mult) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1e3)
        } else if let Some(n) = v.strip_suffix("m") {
            (n, 60e6)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e6)
        } else {
            return None;
        };
        num.parse::<f64>().ok().map(|n| n * mult)
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => out.latency_us.p50 = duration_us(v).unwrap_or(0.0),
            ["90%", v] => out.latency_us.p90 = duration_us(v).unwrap_or(0.0),
            ["99%", v] => {
                out.latency_us.p99 = duration_us(v).unwrap_or(0.0);
                out.latency_us.p999 = out.latency_us.p99;
            }
            [n, "requests", "in", ..] => out.responses = n.parse().unwrap_or(0),
            ["Requests/sec:", v] => out.requests_per_second = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                let n: u64 = n.parse().unwrap_or(0);
                out.errors += n;
                out.error_kinds.insert("status".into(), n);
            }
            ["Socket", "errors:", rest @ ..] => {
                for pair in rest.chunks(2) {
                    if let [kind, n] = pair {
                        let n: u64 = n.trim_end_matches(',').parse().unwrap_or(0);
                        out.errors += n;
                        out.error_kinds.insert(kind.to_string(), n);
                    }
                }
            }
            _ => {}
        }
    }
    if !text.contains("Requests/sec:") {
        bail!("no `Requests/sec` line");
    }
    if out.responses == 0 {
        // Not one response in the whole run: a stall is a result, not a reason to stop.
        out.errors += 1;
        out.error_kinds.insert("no response in the run".into(), 1);
    }
    out.ok = out.responses.saturating_sub(out.errors);
    Ok(out)
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
    let mut cmd = Command::new(rig.lab_exe());
    cmd.args(["--log-level", "warn"]).args(args);
    run_command_in_pod(pod, &mut cmd, limit)
}

/// Runs `cmd` inside `pod` and returns its stdout; killed after `limit`.
fn run_command_in_pod(pod: &LabPod, cmd: &mut Command, limit: Duration) -> Result<String> {
    let args: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut child = pod
        .spawn(
            cmd.stdin(Stdio::null())
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

/// Writes `<out>/<prefix><time>/{results.json,table.md}` for a benchmark started at `started`
/// (RFC 3339; its digits name the directory); returns the directory.
pub(crate) fn write_result_dir(
    out: &std::path::Path,
    prefix: &str,
    started: &str,
    report: &impl Serialize,
    markdown: &str,
) -> Result<PathBuf> {
    let stamp: String = started
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    let dir = out.join(format!("{prefix}{stamp}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    std::fs::write(dir.join("table.md"), markdown)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::parse_wrk;

    #[test]
    fn wrk_report_is_read_with_units() {
        let text = "Running 3s test @ http://198.18.0.3:8080/bytes/64
  1 threads and 1 connections
  Latency Distribution
     50%  250.00us
     75%  300.00us
     90%  1.20ms
     99%   44.10ms
  11000 requests in 3.00s, 2.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   3666.67
Transfer/sec:    682.00KB
";
        let out = parse_wrk(text).expect("parsed");
        assert_eq!(out.responses, 11000);
        assert_eq!(out.errors, 3);
        assert_eq!(out.ok, 10997);
        assert!((out.requests_per_second - 3666.67).abs() < 1e-9);
        assert!((out.latency_us.p50 - 250.0).abs() < 1e-9);
        assert!((out.latency_us.p90 - 1200.0).abs() < 1e-9);
        assert!((out.latency_us.p99 - 44_100.0).abs() < 1e-9);
    }

    #[test]
    fn a_run_without_one_response_is_a_result_with_an_error() {
        let text = "  0 requests in 3.01s, 233.00B read\nRequests/sec:      0.00\n";
        let out = parse_wrk(text).expect("parsed");
        assert_eq!((out.responses, out.ok, out.errors), (0, 0, 1));
        assert!(parse_wrk("wrk: command failed").is_err());
    }
}
