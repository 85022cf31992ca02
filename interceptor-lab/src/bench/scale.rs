//! `interceptor-lab bench-scale`: the datapath and the agent at node scale (issue 14).
//!
//! Two real pods (client, server: netns + veth + cgroup) with this project's sidecar in each and
//! the test app in the server, on the eBPF datapath with its agent (default pass interval, 1 s).
//! Then thousands of filler pods are enabled beside them (`scale/fillers.rs`: real network
//! namespaces, each with an address and a listener on the inbound port). At each pod count:
//! connect() latency, keep-alive and connection-per-request request latency from the client pod
//! (`scale/probe.rs`, rounds, medians), the agent's pass time (its own
//! `interceptor_agent_pass_seconds`), memory and descriptors, and every map's occupancy and
//! kernel memory. At the largest count, `connections` concurrent intercepted connections are
//! opened and closed (`scale/storm.rs`) and the connection maps must return to their baseline;
//! then a soak of bounded cycles (pod churn + a connection wave) watches the agent's memory and
//! descriptors. Last, every filler is disabled and the latencies are measured again.
//!
//! The fillers' namespaces are created (with their listeners, not enabled) and measured
//! before any is enabled: that step is the control for every pod count, which is measured with
//! all of them present. Thousands of namespaces raise connect() and request tails on their own
//! (`interceptor-lab bench-connect --stages 0,created,enabled`).

pub mod connectlat;
mod fillers;
pub mod probe;
pub mod storm;

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use interceptor::bpf::{Pins, occupancy};
use interceptor_common::names::map;
use serde::Serialize;

use self::{
    fillers::Fillers,
    probe::{AgentUse, Sample},
    storm::StormResult,
};
use super::{App, Mode, Rig, Sidecar, Workload};

/// `interceptor-lab bench-scale` options.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Filler pods at the largest step (the two measured pods come on top).
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    /// Intermediate pod counts measured on the way (the agent's pass over 1 000 pods).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize])]
    pub steps: Vec<usize>,
    /// Concurrent intercepted connections opened and closed at the largest step.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Measurement rounds per step (medians; min–max shown). Cheap next to growing the
    /// fillers, and p99s of single rounds on a shared 2-CPU machine spread 3–5×.
    #[arg(long, default_value_t = 9)]
    pub rounds: u32,
    /// connect() calls per round.
    #[arg(long, default_value_t = 2_000)]
    pub connects: u32,
    /// Keep-alive requests per round (a quarter as many with a connection per request).
    #[arg(long, default_value_t = 4_000)]
    pub requests: u64,
    /// Soak cycles at the largest step: each disables and re-enables `churn` pods and opens
    /// and closes `connections / 5` connections.
    #[arg(long, default_value_t = 5)]
    pub soak_cycles: u32,
    #[arg(long, default_value_t = 500)]
    pub churn: usize,
    /// Where to write `scale-<time>/{results.json,table.md}`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// The maps whose occupancy the report shows.
const POD_MAPS: [&str; 6] = [
    map::POD_CONFIG,
    map::POD_INFO,
    map::POD_IPS,
    map::POD_PORTS,
    map::POD_LISTENER,
    map::LISTENERS,
];
const CONNECTION_MAPS: [&str; 4] = [
    map::SOCKS,
    map::TUPLE_ORIG,
    map::COOKIE_ORIG,
    map::MSG_FALLBACK,
];

/// One pod count.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub label: String,
    /// Pods enabled on the node (fillers and the two measured pods).
    pub pods: usize,
    /// Pod network namespaces on the node, enabled or not (fillers and the two measured pods).
    pub namespaces: usize,
    pub rounds: Vec<Sample>,
    pub connect_p50_us: Spread,
    pub connect_p99_us: Spread,
    pub request_p50_us: Spread,
    pub request_p99_us: Spread,
    pub per_request_p50_us: Spread,
    pub errors: u64,
    /// The agent's mean pass over this many pods, milliseconds.
    pub pass_ms: f64,
    /// Mean time of the last 100 `pod enable`s before this step, milliseconds.
    pub enable_ms: Option<f64>,
    /// Every filler enabled again under one registry lock, as an agent's first pass after a
    /// restart does: milliseconds per pod.
    pub reenable_ms_per_pod: Option<f64>,
    /// `registry::list` (what `interceptor pod list` and `status` read), milliseconds.
    pub list_ms: f64,
    /// SIGTERM to exit of an agent that keeps the datapath (`--keep-pinned`, as a Kubernetes
    /// agent's stop is): milliseconds, None at steps without fillers.
    pub keep_stop_ms: Option<f64>,
    pub agent: AgentUse,
    pub maps: Vec<occupancy::MapUse>,
}

/// Median and range over rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// The connection maps before, at the peak of and after the storm.
#[derive(Clone, Debug, Serialize)]
pub struct StormStep {
    pub storm: StormResult,
    pub baseline: Vec<(String, usize)>,
    pub peak: Vec<(String, usize)>,
    pub after_5s: Vec<(String, usize)>,
    pub after: Vec<(String, usize)>,
    /// Seconds after the close until every connection map was back at its baseline; None if
    /// it was not within the wait.
    pub back_after_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakCycle {
    pub cycle: u32,
    pub agent: AgentUse,
    pub storm: StormResult,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub started: String,
    pub kernel: String,
    pub command: String,
    pub cpus: usize,
    pub steps: Vec<Step>,
    pub storm: Option<StormStep>,
    pub soak: Vec<SoakCycle>,
    /// Every filler disabled at the end (`pod disable` each, a lock each): pods and seconds.
    pub disabled: (usize, f64),
    /// Last, every filler enabled again and a standalone agent (no `--keep-pinned`) stopped:
    /// it removes the datapath. Pods, seconds from SIGTERM to exit, and whether it exited by
    /// itself within the grace period.
    pub cleaning_stop: Option<(usize, f64, bool)>,
    pub seconds: f64,
}

/// Runs the benchmark.
pub fn run(args: &ScaleArgs) -> Result<ScaleReport> {
    let t0 = Instant::now();
    settle_namespaces();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let nofile = raise_nofile();
    // Each sidecar holds two descriptors per proxied connection (downstream and upstream).
    let most = usize::try_from(nofile.saturating_sub(1_000) / 2).unwrap_or(usize::MAX);
    let connections = if args.connections > most {
        eprintln!(
            "{} connections need more than this process's open-file limit ({nofile}) allows \
             each sidecar (two descriptors per connection): running {most}",
            args.connections
        );
        most
    } else {
        args.connections
    };
    eprintln!("starting two pods with sidecars and the agent");
    let health = free_port()?;
    // `--keep-pinned`: each step stops the agent and starts another (its stop time) without
    // the datapath going; the rig removes it at the end.
    let keep = agent_args(health, "1", true);
    let mut rig = measured_pods_with("scale", &keep)?;
    let pins = rig.pins().clone();
    let target = rig.app_addr();
    let measure = |rig: &mut Rig, label: &str, fillers: &Fillers| -> Result<Step> {
        eprintln!("measuring: {label}");
        let keep_stop_ms = if fillers.enabled() > 0 {
            let (took, clean) = rig.restart_agent(&keep, STOP_GRACE)?;
            eprintln!(
                "  agent stop (keeping the datapath): {:.0} ms{}",
                took.as_secs_f64() * 1e3,
                if clean { "" } else { ", killed" }
            );
            Some(took.as_secs_f64() * 1e3)
        } else {
            None
        };
        let agent = rig.agent_pid().context("the agent is not running")?;
        let mut s = step(rig, args, label, fillers, &pins, agent, health, target)?;
        s.keep_stop_ms = keep_stop_ms;
        Ok(s)
    };

    let mut fillers = Fillers::new();
    let mut steps = vec![measure(&mut rig, "2 pods (baseline)", &fillers)?];
    // The control: every filler's namespace and listener, none enabled. Holding thousands of
    // namespaces costs the kernel (and so connect() and request tails) whether or not a pod is
    // intercepted; each pod count below is measured with all of them present, so it differs
    // from this step only in what the datapath and the agent hold.
    eprintln!("creating {} filler namespaces (not enabled)", args.pods);
    fillers.create_unenabled(args.pods)?;
    steps.push(measure(
        &mut rig,
        &format!("2 pods, {} namespaces not enabled", args.pods),
        &fillers,
    )?);
    let mut counts: Vec<usize> = args
        .steps
        .iter()
        .copied()
        .filter(|&n| n < args.pods)
        .collect();
    counts.push(args.pods);
    for n in counts {
        eprintln!("enabling filler pods up to {n}");
        // `grow` binds each filler's listener after its enable, as a sidecar starting in an
        // enabled pod does (sockops registers it); the rest get theirs back after.
        fillers.close_unenabled_listeners();
        fillers.grow(n, &pins)?;
        fillers.create_unenabled(args.pods)?;
        steps.push(measure(&mut rig, &format!("{} pods", n + 2), &fillers)?);
    }

    let storm = (connections > 0)
        .then(|| connection_storm(&rig, &pins, target, connections))
        .transpose()?;

    let mut soak = Vec::new();
    for cycle in 1..=args.soak_cycles {
        let churn = args.churn.min(fillers.enabled());
        let top = fillers.enabled();
        fillers.disable_last(churn, &pins)?;
        fillers.grow(top, &pins)?;
        let wave = rig
            .client
            .run(|| storm::run(target, connections / 5, 256, || {}))?;
        std::thread::sleep(Duration::from_secs(2));
        let agent_now = probe::agent_use(rig.agent_pid().context("the agent is not running")?)?;
        eprintln!(
            "soak cycle {cycle}/{}: agent {} KiB, {} fds",
            args.soak_cycles, agent_now.rss_kib, agent_now.fds
        );
        soak.push(SoakCycle {
            cycle,
            agent: agent_now,
            storm: wave,
        });
    }

    eprintln!("disabling every filler pod");
    let all = fillers.enabled();
    let disable_started = Instant::now();
    fillers.disable_last(all, &pins)?;
    let disabled = (all, disable_started.elapsed().as_secs_f64());
    steps.push(measure(&mut rig, "2 pods (after)", &fillers)?);

    // A stop that cleans up, at the largest count: an agent without --keep-pinned removes every
    // pod's sk_lookup link and the pins.
    eprintln!("enabling {all} filler pods again (one lock) for a cleaning stop");
    fillers.grow_one_lock(all, &pins)?;
    rig.restart_agent(&agent_args(health, "1", false), STOP_GRACE)?;
    let (took, clean) = rig.stop_agent(STOP_GRACE);
    eprintln!(
        "  agent stop (removing the datapath, {} pods): {:.2} s{}",
        all + 2,
        took.as_secs_f64(),
        if clean { "" } else { ", killed" }
    );
    let cleaning_stop = Some((all + 2, took.as_secs_f64(), clean));
    drop(fillers);
    drop(rig);
    Ok(ScaleReport {
        started,
        kernel: interceptor::bpf::features::kernel_release(),
        command: std::env::var("INTERCEPTOR_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        steps,
        storm,
        soak,
        disabled,
        cleaning_stop,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Waits (at most 10 minutes) until the kernel has finished destroying network namespaces
/// deleted before this run (an earlier benchmark's thousands of fillers): `cleanup_net` runs
/// in a kernel worker for minutes after `ip netns del` returns (~3 min for 10 000 here), holds
/// the lock namespace creation needs and takes CPU from whatever is measured meanwhile. A
/// worker running an item of the `netns` workqueue is named `kworker/…+netns`; done when none
/// has been seen for 3 s. (`net_namespace` slab counts do not fall with it: freed objects stay
/// in the allocator's per-CPU slabs.)
pub(crate) fn settle_namespaces() {
    fn cleaning() -> bool {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return false;
        };
        dir.filter_map(Result::ok).any(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("kworker/") && c.trim_end().ends_with("+netns"))
        })
    }
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    let mut told = false;
    while quiet_since.elapsed() < Duration::from_secs(3)
        && started.elapsed() < Duration::from_secs(600)
    {
        if cleaning() {
            if !told {
                eprintln!("waiting for the kernel to finish destroying deleted network namespaces");
                told = true;
            }
            quiet_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if told {
        eprintln!("  done after {:.0} s", started.elapsed().as_secs_f64());
    }
}

/// `interceptor-lab scale-fillers` options.
#[derive(Debug, clap::Args)]
pub struct FillerArgs {
    /// The datapath instance (a running agent's `--pin-root`).
    #[arg(long)]
    pub pin_root: PathBuf,
    /// Filler pods to create and enable.
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
}

/// Creates and enables `pods` filler pods on a running agent's datapath (one registry lock),
/// prints `fillers ready`, and holds them until stdin closes; then deletes their namespaces
/// (their pods are left to the agent's next pass). For profiling the agent and `pod` commands
/// at node scale by hand.
pub fn hold_fillers(args: &FillerArgs) -> Result<()> {
    let pins = Pins::new(&args.pin_root);
    let mut fillers = Fillers::new();
    let took = fillers.grow_one_lock(args.pods, &pins)?;
    eprintln!(
        "enabled {} filler pods in {:.1} s (one lock)",
        args.pods,
        took.as_secs_f64()
    );
    println!("fillers ready");
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    Ok(())
}

/// The two measured pods (client, server with the test app), this project's sidecar in each,
/// on the eBPF datapath with its agent, whose health/metrics address is returned beside them.
fn measured_pods(tag: &str, reconcile_seconds: &str) -> Result<(Rig, SocketAddr)> {
    let health = free_port()?;
    let rig = measured_pods_with(tag, &agent_args(health, reconcile_seconds, false))?;
    Ok((rig, health))
}

/// How long a stopping agent gets before SIGKILL: Kubernetes' default grace period.
const STOP_GRACE: Duration = Duration::from_secs(30);

fn agent_args(health: SocketAddr, reconcile_seconds: &str, keep_pinned: bool) -> Vec<String> {
    let mut args = vec![
        "--health-addr".to_owned(),
        health.to_string(),
        "--reconcile-seconds".to_owned(),
        reconcile_seconds.to_owned(),
    ];
    if keep_pinned {
        args.push("--keep-pinned".to_owned());
    }
    args
}

fn measured_pods_with(tag: &str, agent_args: &[String]) -> Result<Rig> {
    let rig = Rig::new(
        Mode::Ebpf,
        Workload::Http {
            app: App::Testapp,
            sidecar: Sidecar::Interceptor,
            sizes: &[64],
        },
        tag,
        agent_args,
    )?;
    Ok(rig)
}

#[allow(clippy::too_many_arguments)]
fn step(
    rig: &Rig,
    args: &ScaleArgs,
    label: &str,
    fillers: &Fillers,
    pins: &Pins,
    agent: u32,
    health: SocketAddr,
    target: SocketAddr,
) -> Result<Step> {
    let (pass_s, _) = probe::pass_time(health, Duration::from_secs(3))?;
    let mut rounds = Vec::new();
    let processes = rig.pids();
    for _ in 0..args.rounds {
        rounds.push(probe::sample(
            &rig.client,
            target,
            args.connects,
            args.requests,
            &processes,
        )?);
    }
    let list_started = Instant::now();
    let listed = interceptor::registry::list(pins, &interceptor::bpf::Maps::open(pins)?)?;
    let list_ms = list_started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        listed.len() == fillers.enabled() + 2,
        "{} pods listed, {} enabled",
        listed.len(),
        fillers.enabled() + 2
    );
    let reenable_ms_per_pod = if fillers.enabled() > 0 {
        let took = fillers.reenable_all(pins)?;
        Some(took.as_secs_f64() * 1e3 / fillers.enabled() as f64)
    } else {
        None
    };
    let enable = &fillers.enable_seconds;
    let enable_ms = (!enable.is_empty()).then(|| {
        let last = &enable[enable.len().saturating_sub(100)..];
        1e3 * last.iter().sum::<f64>() / last.len() as f64
    });
    Ok(Step {
        label: label.to_owned(),
        pods: fillers.enabled() + 2,
        namespaces: fillers.namespaces() + 2,
        connect_p50_us: Spread::of(rounds.iter().map(|r| r.connect.p50_us)),
        connect_p99_us: Spread::of(rounds.iter().map(|r| r.connect.p99_us)),
        request_p50_us: Spread::of(rounds.iter().map(|r| r.request.p50_us)),
        request_p99_us: Spread::of(rounds.iter().map(|r| r.request.p99_us)),
        per_request_p50_us: Spread::of(rounds.iter().map(|r| r.connection_per_request.p50_us)),
        errors: rounds
            .iter()
            .map(|r| r.connect.errors + r.request.errors + r.connection_per_request.errors)
            .sum(),
        rounds,
        pass_ms: pass_s * 1e3,
        enable_ms,
        reenable_ms_per_pod,
        list_ms,
        keep_stop_ms: None,
        agent: probe::agent_use(agent)?,
        maps: occupancy::occupancy(pins),
    })
}

fn connections(pins: &Pins) -> Vec<(String, usize)> {
    CONNECTION_MAPS
        .iter()
        .map(|&m| {
            let n = occupancy::map_use(pins, m)
                .and_then(|u| u.entries)
                .unwrap_or(0);
            (m.to_owned(), n)
        })
        .collect()
}

fn connection_storm(rig: &Rig, pins: &Pins, target: SocketAddr, n: usize) -> Result<StormStep> {
    eprintln!("opening {n} concurrent connections through both sidecars");
    let baseline = connections(pins);
    let mut peak = Vec::new();
    let result = rig
        .client
        .run(|| storm::run(target, n, 256, || peak = connections(pins)))?;
    eprintln!(
        "  {} open ({} failed) in {:.1} s; closed, waiting for the maps",
        result.open, result.failed, result.open_seconds
    );
    let closed = Instant::now();
    // Five seconds on, the app-side sockets are gone; what is left are the sidecars' pooled
    // idle connections (app↔proxy hops of the server pod), closed at their idle timeout (90 s).
    std::thread::sleep(Duration::from_secs(5));
    let after_5s = connections(pins);
    let mut after = connections(pins);
    let back = |now: &[(String, usize)]| now.iter().zip(&baseline).all(|((_, a), (_, b))| a <= b);
    while !back(&after) && closed.elapsed() < Duration::from_secs(150) {
        std::thread::sleep(Duration::from_millis(500));
        after = connections(pins);
    }
    Ok(StormStep {
        back_after_seconds: back(&after).then(|| closed.elapsed().as_secs_f64()),
        storm: result,
        baseline,
        peak,
        after_5s,
        after,
    })
}

/// The sidecars, the app and this process each hold thousands of sockets; children inherit the
/// limit. Raises the soft limit to the hard one (raising the hard one needs CAP_SYS_RESOURCE);
/// returns the limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        eprintln!("could not raise the open-file limit to {hard}: {err}");
    }
    hard
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn us(s: Spread) -> String {
    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
}

impl ScaleReport {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Command: `{}` — {} on {} ({} CPUs), {:.0} s. Latencies from the client pod through \
             both sidecars on the eBPF datapath, medians of {} rounds (min–max), microseconds; \
             connect() with its thread alone on one CPU, the rig's processes on the others. \
             Every pod count is measured with all the fillers' namespaces present, enabled or \
             not: the row with 2 pods and those namespaces is its control (the kernel's cost \
             of the namespaces themselves, without interception, is the difference between it \
             and the baseline).\n",
            self.command,
            self.started,
            self.kernel,
            self.cpus,
            self.seconds,
            self.steps.first().map_or(0, |s| s.rounds.len())
        );
        let _ = writeln!(
            out,
            "| pods enabled | namespaces | connect() p50 | connect() p99 | request p50 | request p99 | \
             conn-per-request p50 | errors | agent pass ms | `pod enable` ms | re-enable all, \
             ms per pod | `pod list` ms | agent stop ms | agent RSS MiB | agent fds |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.1} | {} | {:.1} | {} |",
                s.label,
                s.namespaces,
                us(s.connect_p50_us),
                us(s.connect_p99_us),
                us(s.request_p50_us),
                us(s.request_p99_us),
                us(s.per_request_p50_us),
                s.errors,
                s.pass_ms,
                s.enable_ms
                    .map_or_else(|| "–".to_owned(), |m| format!("{m:.2}")),
                s.reenable_ms_per_pod
                    .map_or_else(|| "–".to_owned(), |m| format!("{m:.2}")),
                s.list_ms,
                s.keep_stop_ms
                    .map_or_else(|| "–".to_owned(), |m| format!("{m:.0}")),
                s.agent.rss_kib as f64 / 1024.0,
                s.agent.fds
            );
        }
        let _ = writeln!(
            out,
            "\nPod maps at each step (entries / capacity, kernel memory):\n"
        );
        let _ = write!(out, "| map |");
        for s in &self.steps {
            let _ = write!(out, " {} |", s.label);
        }
        let _ = write!(out, "\n|---|");
        for _ in &self.steps {
            let _ = write!(out, "---|");
        }
        let _ = writeln!(out);
        for name in POD_MAPS.iter().chain(CONNECTION_MAPS.iter()) {
            let _ = write!(out, "| {name} |");
            for s in &self.steps {
                let cell = s.maps.iter().find(|m| m.name == *name).map_or_else(
                    || "–".to_owned(),
                    |m| {
                        format!(
                            "{} / {} ({})",
                            m.entries.unwrap_or(0),
                            m.capacity,
                            m.memlock_bytes.map_or_else(
                                || "–".to_owned(),
                                |b| format!("{:.0} KiB", b as f64 / 1024.0)
                            )
                        )
                    },
                );
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
        let _ = write!(out, "| all maps, kernel memory |");
        for s in &self.steps {
            let total: u64 = s.maps.iter().filter_map(|m| m.memlock_bytes).sum();
            let _ = write!(out, " {:.1} MiB |", total as f64 / 1048576.0);
        }
        let _ = writeln!(out);
        let (pods, seconds) = self.disabled;
        if pods > 0 {
            let _ = writeln!(
                out,
                "\nDisabling the {pods} filler pods one `pod disable` at a time took {seconds:.1} s \
                 ({:.2} ms per pod).",
                seconds * 1e3 / pods as f64
            );
        }
        if self.steps.iter().any(|s| s.keep_stop_ms.is_some()) {
            let _ = writeln!(
                out,
                "\nAgent stop: SIGTERM to exit of an agent keeping the datapath (`--keep-pinned`, \
                 as a Kubernetes agent's stop that is not an uninstall), before the step's \
                 measurements (a new agent is started after it)."
            );
        }
        if let Some((pods, seconds, clean)) = self.cleaning_stop {
            let _ = writeln!(
                out,
                "\nStopping a standalone agent (it removes the datapath: every pod's sk_lookup \
                 link and the pins) with {pods} pods enabled took {seconds:.2} s{}.",
                if clean { "" } else { " and it was killed" }
            );
        }
        if let Some(st) = &self.storm {
            let _ = writeln!(
                out,
                "\n{} concurrent intercepted connections at {} pods: {} open, {} failed, opened \
                 in {:.1} s; connection maps back to their baseline {} after the close.\n",
                st.storm.wanted,
                self.steps.iter().map(|s| s.pods).max().unwrap_or(0),
                st.storm.open,
                st.storm.failed,
                st.storm.open_seconds,
                st.back_after_seconds.map_or_else(
                    || "**not** within 150 s".to_owned(),
                    |s| format!("{s:.1} s")
                )
            );
            let _ = writeln!(
                out,
                "| map | before | all open | 5 s after close | end of the wait |\n|---|---|---|---|---|"
            );
            for (i, (name, before)) in st.baseline.iter().enumerate() {
                let peak = st.peak.get(i).map_or(0, |p| p.1);
                let five = st.after_5s.get(i).map_or(0, |p| p.1);
                let after = st.after.get(i).map_or(0, |p| p.1);
                let _ = writeln!(out, "| {name} | {before} | {peak} | {five} | {after} |");
            }
        }
        if !self.soak.is_empty() {
            let _ = writeln!(
                out,
                "\nSoak (each cycle: pods disabled and enabled again, a wave of connections \
                 opened and closed):\n\n| cycle | agent RSS MiB | agent fds | wave open / failed |\n|---|---|---|---|"
            );
            for c in &self.soak {
                let _ = writeln!(
                    out,
                    "| {} | {:.1} | {} | {} / {} |",
                    c.cycle,
                    c.agent.rss_kib as f64 / 1024.0,
                    c.agent.fds,
                    c.storm.open,
                    c.storm.failed
                );
            }
        }
        out
    }

    /// Writes `<out>/scale-<time>/{results.json,table.md}`; returns the directory.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        super::write_result_dir(out, "scale-", &self.started, self, &self.markdown())
    }
}
