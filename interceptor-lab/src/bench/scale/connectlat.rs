//! `interceptor-lab bench-connect`: why connect() from the client pod is sometimes twice as slow
//! (16 vs 33 µs p50) in the scale benchmark. The same two pods and sidecars as `bench-scale`,
//! then rounds of connect() (as `probe::sample` measures them: each round on a fresh thread in
//! the client pod), each round under one condition:
//!
//! - `free`: nothing pinned (what `bench-scale` did until it pinned, below);
//! - `apart`: the client sidecar's threads on CPU 1, the probe on CPU 0;
//! - `together`: the client sidecar's threads and the probe on CPU 1;
//! - `pinned`: the probe alone on CPU 0, every process of the rig (sidecars, app, agent) on
//!   the other CPUs: what `bench-scale` does now (`probe::Apart`);
//! - `agent-stopped`: nothing pinned, the agent SIGSTOPped for the round;
//! - `pinned-agent-stopped`: as `pinned`, the agent SIGSTOPped for the round (the agent's
//!   periodic pass grows with the pods: does it set the tail?).
//!
//! With `--requests`, each round then sends that many keep-alive GETs through both sidecars
//! under the same condition (unpinned, as `bench-scale` measures them; the agent still stopped
//! in the `*agent-stopped` conditions).
//!
//! Conditions alternate round by round. Each round also records the CPU the probe ran on,
//! its voluntary and involuntary context switches and the share of connects above 25 µs.
//! Stages: `0` (the two pods only), `created` (`--fillers` namespaces with a listener on
//! 15006 each, not enabled: the kernel's share), `enabled` (the same namespaces enabled as pods:
//! the datapath's and the agent's share).

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity},
    sys::{
        resource::{UsageWho, getrusage},
        signal::{Signal, kill},
    },
    unistd::Pid,
};
use serde::Serialize;

use super::{Spread, fillers::Fillers, probe::Apart};
use crate::loadgen::Histogram;

/// `interceptor-lab bench-connect` options.
#[derive(Debug, clap::Args)]
pub struct ConnectLatArgs {
    /// Stages, in order: `0`, `created`, `enabled`.
    #[arg(long, value_delimiter = ',', default_values_t = ["0".to_owned()])]
    pub stages: Vec<String>,
    /// Filler namespaces of the `created` and `enabled` stages.
    #[arg(long, default_value_t = 10_000)]
    pub fillers: usize,
    /// Conditions, alternated round by round.
    #[arg(long, value_delimiter = ',', default_values_t = ["free".to_owned(), "pinned".to_owned(), "agent-stopped".to_owned()])]
    pub conditions: Vec<String>,
    /// Keep-alive requests through both sidecars after each round's connects (0: none).
    #[arg(long, default_value_t = 0)]
    pub requests: u64,
    /// Rounds of each condition at each stage.
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// connect() calls per round.
    #[arg(long, default_value_t = 1_000)]
    pub connects: u32,
    /// Before each round, wait (at most 20 s) until the client pod holds fewer TIME_WAIT
    /// sockets than this: near the ephemeral port range (28 232 ports) connect() spends its
    /// time in `__inet_hash_connect` looking for a free port, which is not what is measured.
    #[arg(long, default_value_t = 12_000)]
    pub max_time_wait: u64,
    /// The agent's `--reconcile-seconds`.
    #[arg(long, default_value = "1")]
    pub reconcile_seconds: String,
    /// Where to write `connect-<time>/{results.json,table.md}`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub stage: String,
    pub condition: String,
    pub round: u32,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    /// Keep-alive request latency of the round (`--requests`), µs; 0 without.
    pub request_p50_us: f64,
    pub request_p99_us: f64,
    /// Share of connects that took more than 25 µs.
    pub slow_share: f64,
    /// CPUs the probe was seen on (per connect), counts per CPU.
    pub probe_cpus: Vec<u64>,
    /// The CPU each of the client sidecar's threads was last on after the round.
    pub sidecar_cpus: Vec<(String, i32)>,
    /// The probe thread's id and its CLOCK_REALTIME span, seconds (to find it in a trace).
    pub tid: i32,
    pub start_s: f64,
    pub end_s: f64,
    /// Steal time during the round (/proc/stat ticks, both CPUs): the hypervisor ran others.
    pub steal_ticks: u64,
    /// Busy ticks of both CPUs during the round minus those of this process, the agent, the
    /// sidecars and the app: someone else's work on the machine (tick-sampled, coarse).
    pub foreign_ticks: i64,
    /// TIME_WAIT sockets in the client pod's namespace before and after the round
    /// (`/proc/net/sockstat`).
    pub time_wait_before: u64,
    pub time_wait_after: u64,
    pub voluntary_switches: i64,
    pub involuntary_switches: i64,
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct ConnectLatReport {
    pub started: String,
    pub kernel: String,
    pub command: String,
    pub cpus: usize,
    pub rounds: Vec<Round>,
    pub seconds: f64,
}

pub fn run(args: &ConnectLatArgs) -> Result<ConnectLatReport> {
    let t0 = Instant::now();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        bail!("needs two CPUs");
    }
    super::settle_namespaces();
    let (rig, _health) = super::measured_pods("connlat", &args.reconcile_seconds)?;
    let pins = rig.pins().clone();
    let agent = rig.agent_pid().context("the agent is not running")?;
    let sidecar = rig
        .process_pid(&format!("{} sidecar", rig.client.name))
        .context("no client sidecar")?;
    let target = rig.app_addr();
    let server_sidecar = rig
        .process_pid(&format!("{} sidecar", rig.server.name))
        .context("no server sidecar")?;
    let app = rig
        .process_pid(&format!("{} app", rig.server.name))
        .context("no app")?;
    // Everything of ours but the client sidecar (pinned by the conditions) and this process.
    let others = [agent, server_sidecar, app];
    let ours = [std::process::id(), sidecar, agent, server_sidecar, app];
    let mut fillers = Fillers::new();
    let mut rounds = Vec::new();
    let all = all_cpus(cpus)?;
    for stage in &args.stages {
        match stage.as_str() {
            "0" => {}
            "created" => {
                eprintln!("creating {} filler namespaces (not enabled)", args.fillers);
                fillers.create_unenabled(args.fillers)?;
            }
            "enabled" => {
                eprintln!("enabling {} filler pods", args.fillers);
                fillers.close_unenabled_listeners();
                fillers.grow(args.fillers, &pins)?;
                // Let the agent's passes settle on the new count.
                std::thread::sleep(Duration::from_secs(3));
            }
            other => bail!("unknown stage {other:?}"),
        }
        for round in 0..args.rounds {
            for condition in &args.conditions {
                let (probe_cpu, sidecar_set, others_set) = match condition.as_str() {
                    "free" | "agent-stopped" | "pinned-agent-stopped" => (None, all, all),
                    "apart" => (Some(0), one_cpu(1)?, all),
                    "together" => (Some(1), one_cpu(1)?, all),
                    // As `bench-scale` measures now (`probe::Apart`): below.
                    "pinned" => (None, all, all),
                    other => bail!("unknown condition {other:?}"),
                };
                let waited = Instant::now();
                while rig.client.run(time_wait)? >= args.max_time_wait
                    && waited.elapsed() < Duration::from_secs(20)
                {
                    std::thread::sleep(Duration::from_millis(250));
                }
                set_process_affinity(sidecar, &sidecar_set)?;
                for &p in &others {
                    set_process_affinity(p, &others_set)?;
                }
                let cpu0 = cpu_ticks();
                let ours0: u64 = ours.iter().map(|&p| process_ticks(p)).sum();
                let stopped = condition.ends_with("agent-stopped");
                if stopped {
                    kill(Pid::from_raw(agent as i32), Signal::SIGSTOP)?;
                }
                let apart = condition
                    .starts_with("pinned")
                    .then(|| Apart::new(&rig.pids()))
                    .transpose()?;
                let measured = rig.client.run(|| {
                    let _pinned = apart.as_ref().and_then(Apart::pin_this_thread);
                    probe(target, args.connects, probe_cpu, cpus)
                });
                drop(apart);
                let requests = (args.requests > 0)
                    .then(|| {
                        rig.client.run(|| {
                            super::probe::load(
                                target,
                                args.requests,
                                crate::loadgen::Mode::KeepAlive,
                            )
                        })
                    })
                    .transpose()?
                    .transpose()?;
                if stopped {
                    kill(Pid::from_raw(agent as i32), Signal::SIGCONT)?;
                }
                let cpu1 = cpu_ticks();
                let ours1: u64 = ours.iter().map(|&p| process_ticks(p)).sum();
                set_process_affinity(sidecar, &all)?;
                for &p in &others {
                    set_process_affinity(p, &all)?;
                }
                let m = measured??;
                let (request_p50_us, request_p99_us) = requests
                    .as_ref()
                    .map_or((0.0, 0.0), |r| (r.latency_us.p50, r.latency_us.p99));
                let r = Round {
                    request_p50_us,
                    request_p99_us,
                    stage: stage.clone(),
                    condition: condition.clone(),
                    round,
                    sidecar_cpus: thread_cpus(sidecar),
                    steal_ticks: cpu1.1.saturating_sub(cpu0.1),
                    foreign_ticks: (cpu1.0.saturating_sub(cpu0.0)) as i64
                        - (ours1.saturating_sub(ours0)) as i64,
                    ..m
                };
                eprintln!(
                    "{:>8} {:>14} r{:<2} tid {} t {:.6}-{:.6} steal {} foreign {} tw {}->{} p50 {:5.1} p99 {:6.1} mean {:5.1} slow {:4.2} probe cpus {:?} \
                     csw {}/{} sidecar cpus {:?} request p50 {:.0} p99 {:.0}",
                    r.stage,
                    r.condition,
                    r.round,
                    r.tid,
                    r.start_s,
                    r.end_s,
                    r.steal_ticks,
                    r.foreign_ticks,
                    r.time_wait_before,
                    r.time_wait_after,
                    r.p50_us,
                    r.p99_us,
                    r.mean_us,
                    r.slow_share,
                    r.probe_cpus,
                    r.voluntary_switches,
                    r.involuntary_switches,
                    r.sidecar_cpus,
                    r.request_p50_us,
                    r.request_p99_us
                );
                rounds.push(r);
            }
        }
    }
    drop(fillers);
    drop(rig);
    Ok(ConnectLatReport {
        started,
        kernel: interceptor::bpf::features::kernel_release(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpus,
        rounds,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn all_cpus(n: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    for c in 0..n {
        set.set(c)?;
    }
    Ok(set)
}

fn one_cpu(c: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(c)?;
    Ok(set)
}

/// Every thread of `pid` onto `set`.
fn set_process_affinity(pid: u32, set: &CpuSet) -> Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // A thread may have exited meanwhile.
        let _ = sched_setaffinity(Pid::from_raw(tid), set);
    }
    Ok(())
}

/// The name of each thread of `pid` and the CPU it last ran on (field 39 of its stat).
fn thread_cpus(pid: u32) -> Vec<(String, i32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<(String, i32)> = dir
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, after) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            Some((name, after.split_whitespace().nth(36)?.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

/// TIME_WAIT sockets of this thread's network namespace.
fn time_wait() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/net/sockstat").unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|&w| w == "tw")
                .and_then(|i| f.get(i + 1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CLOCK_REALTIME, seconds (`perf record -k CLOCK_REALTIME` stamps its samples with it).
fn realtime_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Busy (everything but idle and iowait) and steal ticks of all CPUs, from /proc/stat.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0, 0);
    }
    // user nice system idle iowait irq softirq steal
    (v[0] + v[1] + v[2] + v[5] + v[6], v[7])
}

/// utime + stime of every thread of `pid` (ticks).
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat, counted from the state (field 3).
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

/// connect() then close, `n` times, as `probe::connect_latency` does, on this thread pinned to
/// `cpu` if given.
fn probe(target: SocketAddr, n: u32, cpu: Option<usize>, cpus: usize) -> Result<Round> {
    let before = sched_getaffinity(Pid::from_raw(0))?;
    if let Some(c) = cpu {
        sched_setaffinity(Pid::from_raw(0), &one_cpu(c)?)?;
    }
    let time_wait_before = time_wait();
    let usage0 = getrusage(UsageWho::RUSAGE_THREAD)?;
    let start = realtime_s();
    let mut h = Histogram::default();
    let mut errors = 0;
    let mut slow = 0u64;
    let mut on = vec![0u64; cpus];
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        if let Ok(c) = sched_getcpu()
            && let Some(slot) = on.get_mut(c)
        {
            *slot += 1;
        }
        let t = Instant::now();
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => {
                let d = t.elapsed();
                h.record(d);
                if d > Duration::from_micros(25) {
                    slow += 1;
                }
                drop(s);
            }
            Err(_) => errors += 1,
        }
    }
    let usage1 = getrusage(UsageWho::RUSAGE_THREAD)?;
    let time_wait_after = time_wait();
    let end = realtime_s();
    sched_setaffinity(Pid::from_raw(0), &before)?;
    let p = h.percentiles();
    Ok(Round {
        stage: String::new(),
        condition: String::new(),
        round: 0,
        p50_us: p.p50,
        p99_us: p.p99,
        mean_us: p.mean,
        request_p50_us: 0.0,
        request_p99_us: 0.0,
        slow_share: slow as f64 / h.count().max(1) as f64,
        probe_cpus: on,
        sidecar_cpus: Vec::new(),
        tid: nix::unistd::gettid().as_raw(),
        start_s: start,
        end_s: end,
        steal_ticks: 0,
        foreign_ticks: 0,
        time_wait_before,
        time_wait_after,
        voluntary_switches: usage1.voluntary_context_switches()
            - usage0.voluntary_context_switches(),
        involuntary_switches: usage1.involuntary_context_switches()
            - usage0.involuntary_context_switches(),
        errors,
    })
}

impl ConnectLatReport {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Command: `{}` — {} on {} ({} CPUs), {:.0} s. connect() from the client pod, \
             microseconds: median over rounds of each round's p50 and p99 (min–max), rounds \
             whose p50 is above 25 µs, mean share of connects above 25 µs, involuntary context \
             switches per connect; keep-alive request p99 through both sidecars (with \
             `--requests`).\n",
            self.command, self.started, self.kernel, self.cpus, self.seconds
        );
        let _ = writeln!(
            out,
            "| stage | condition | rounds | connect() p50 | connect() p99 | rounds > 25 µs | \
             connects > 25 µs | involuntary csw / connect | request p99 |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for r in &self.rounds {
            let k = (r.stage.as_str(), r.condition.as_str());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        for (stage, condition) in keys {
            let rs: Vec<&Round> = self
                .rounds
                .iter()
                .filter(|r| r.stage == stage && r.condition == condition)
                .collect();
            let p50 = Spread::of(rs.iter().map(|r| r.p50_us));
            let p99 = Spread::of(rs.iter().map(|r| r.p99_us));
            let request = Spread::of(rs.iter().map(|r| r.request_p99_us));
            let slow_rounds = rs.iter().filter(|r| r.p50_us > 25.0).count();
            let slow_share = rs.iter().map(|r| r.slow_share).sum::<f64>() / rs.len() as f64;
            let connects: f64 = rs
                .iter()
                .map(|r| r.probe_cpus.iter().sum::<u64>() as f64)
                .sum();
            let ivcsw: f64 = rs.iter().map(|r| r.involuntary_switches as f64).sum();
            let _ = writeln!(
                out,
                "| {stage} | {condition} | {} | {:.1} ({:.1}–{:.1}) | {:.0} ({:.0}–{:.0}) | \
                 {slow_rounds} | {:.0} % | {:.2} | {} |",
                rs.len(),
                p50.median,
                p50.min,
                p50.max,
                p99.median,
                p99.min,
                p99.max,
                slow_share * 100.0,
                ivcsw / connects.max(1.0),
                if request.max > 0.0 {
                    format!(
                        "{:.0} ({:.0}–{:.0})",
                        request.median, request.min, request.max
                    )
                } else {
                    "–".to_owned()
                }
            );
        }
        out
    }

    pub fn write(&self, out: &std::path::Path) -> Result<PathBuf> {
        crate::bench::write_result_dir(out, "connect-", &self.started, self, &self.markdown())
    }
}
