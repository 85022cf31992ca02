//! What the scale benchmark measures at each step: the cost of a connect() and of a request
//! through both sidecars (from the client pod), the agent's process (memory, descriptors, pass
//! time from its `/metrics`), and the maps' occupancy.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde::Serialize;

use crate::{
    lab::LabPod,
    loadgen::{self, Histogram, LoadSpec, Mode},
};

/// Latency of one kind of operation, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// One measurement round at one pod count.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// connect() of an intercepted connection (connect4's map lookups, the redirect to the
    /// sidecar), then close; measured with the thread alone on one CPU (`Apart`).
    pub connect: Latency,
    /// Keep-alive GETs, one at a time, through both sidecars.
    pub request: Latency,
    pub request_per_second: f64,
    /// A new connection per GET.
    pub connection_per_request: Latency,
}

/// Runs one round from `client` against `target`; `rig` are the pids of the rig's processes
/// (sidecars, app, agent), kept off the CPU that measures connect() (see `Apart`).
pub fn sample(
    client: &LabPod,
    target: SocketAddr,
    connects: u32,
    requests: u64,
    rig: &[u32],
) -> Result<Sample> {
    let apart = Apart::new(rig)?;
    let connect = client.run(|| {
        let _pinned = apart.pin_this_thread();
        connect_latency(target, connects)
    });
    drop(apart);
    let connect = connect?;
    let keep_alive = client.run(|| load(target, requests, Mode::KeepAlive))??;
    let per_request = client.run(|| load(target, requests / 4, Mode::ConnectionPerRequest))??;
    Ok(Sample {
        connect,
        request: latency_of(&keep_alive),
        request_per_second: keep_alive.requests_per_second,
        connection_per_request: latency_of(&per_request),
    })
}

/// The connect() loop's thread alone on one CPU, every process of the rig on the others, for
/// as long as this lives (each thread's affinity is restored on drop). Without it the result
/// depends on where the scheduler puts a new thread: on this 2-CPU machine, a round whose probe
/// shares its CPU with the client sidecar's accepting thread measures the sidecar's accept
/// too (each connect() wakes it and it preempts the probe: ~0.8 involuntary context switches
/// per connect, p50 30–35 µs instead of 15–17; `bench-connect`, README "Node scale"). A
/// single-CPU machine pins nothing.
pub struct Apart {
    probe_cpu: Option<usize>,
    saved: Vec<(Pid, CpuSet)>,
}

impl Apart {
    pub fn new(pids: &[u32]) -> Result<Self> {
        let allowed = sched_getaffinity(Pid::from_raw(0))?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let mut apart = Self {
            probe_cpu: None,
            saved: Vec::new(),
        };
        let [probe_cpu, rest @ ..] = cpus.as_slice() else {
            return Ok(apart);
        };
        if rest.is_empty() {
            return Ok(apart);
        }
        let mut others = CpuSet::new();
        for &c in rest {
            others.set(c)?;
        }
        for &pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.filter_map(Result::ok) {
                let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let tid = Pid::from_raw(tid);
                // A thread may have exited meanwhile.
                if let Ok(before) = sched_getaffinity(tid)
                    && sched_setaffinity(tid, &others).is_ok()
                {
                    apart.saved.push((tid, before));
                }
            }
        }
        apart.probe_cpu = Some(*probe_cpu);
        Ok(apart)
    }

    /// Pins the calling thread to the probe's CPU until the guard drops.
    pub fn pin_this_thread(&self) -> Option<PinnedThread> {
        let cpu = self.probe_cpu?;
        let before = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let mut one = CpuSet::new();
        one.set(cpu).ok()?;
        sched_setaffinity(Pid::from_raw(0), &one).ok()?;
        Some(PinnedThread { before })
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        for (tid, set) in &self.saved {
            let _ = sched_setaffinity(*tid, set);
        }
    }
}

pub struct PinnedThread {
    before: CpuSet,
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        let _ = sched_setaffinity(Pid::from_raw(0), &self.before);
    }
}

fn latency_of(r: &loadgen::LoadResult) -> Latency {
    Latency {
        count: r.responses,
        p50_us: r.latency_us.p50,
        p99_us: r.latency_us.p99,
        errors: r.errors + (r.responses - r.ok),
    }
}

pub(super) fn connect_latency(target: SocketAddr, n: u32) -> Latency {
    let mut h = Histogram::default();
    let mut errors = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => {
                h.record(t.elapsed());
                drop(s);
            }
            Err(_) => errors += 1,
        }
    }
    let p = h.percentiles();
    Latency {
        count: h.count(),
        p50_us: p.p50,
        p99_us: p.p99,
        errors,
    }
}

pub(super) fn load(target: SocketAddr, requests: u64, mode: Mode) -> Result<loadgen::LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(loadgen::run(LoadSpec::new(
        target,
        "server",
        "/bytes/64",
        1,
        requests,
        Duration::from_secs(20),
        mode,
    ))))
}

/// The agent process as the kernel sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentUse {
    pub rss_kib: u64,
    pub fds: usize,
}

pub fn agent_use(pid: u32) -> Result<AgentUse> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the agent's /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(AgentUse { rss_kib, fds })
}

/// `interceptor_agent_pass_seconds` sum and count, and `interceptor_agent_pods`, from the
/// agent's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassCounter {
    pub sum: f64,
    pub count: f64,
    pub pods: f64,
}

pub fn pass_counter(health: SocketAddr) -> Result<PassCounter> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect_timeout(&health, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Ok(PassCounter {
        sum: value("interceptor_agent_pass_seconds_sum").context("no pass_seconds in /metrics")?,
        count: value("interceptor_agent_pass_seconds_count").unwrap_or(0.0),
        pods: value("interceptor_agent_pods").unwrap_or(0.0),
    })
}

/// The agent's mean pass time over `window` (at least one pass), seconds, and the pods it saw.
pub fn pass_time(health: SocketAddr, window: Duration) -> Result<(f64, f64)> {
    let before = pass_counter(health)?;
    let deadline = Instant::now() + window.max(Duration::from_secs(1)) * 4;
    std::thread::sleep(window);
    loop {
        let after = pass_counter(health)?;
        if after.count > before.count {
            return Ok((
                (after.sum - before.sum) / (after.count - before.count),
                after.pods,
            ));
        }
        if Instant::now() > deadline {
            anyhow::bail!("the agent made no pass in {:?}", window * 4);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
