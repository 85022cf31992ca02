//! `interceptor-lab dns-bench`: the sidecar's DNS proxy behind DNS capture (eBPF and iptables
//! modes) against asking the resolver directly, with the same client.
//!
//! Pods: dnsmasq in `dns` (the resolver), a `direct` pod that asks it without capture, and one
//! pod per capture mode with this product's sidecar. The client is [`load`]: a bounded loop of
//! sequential A queries on a connected UDP socket (as glibc's stub resolver sends them), run on
//! a thread inside the pod's network namespace. Names:
//! - `cached`: one name dnsmasq answers; through the capture, the sidecar's cache answers it
//!   after the first query.
//! - `local`: a mesh name the sidecar answers from its config (dnsmasq does not know it; direct,
//!   the row asks dnsmasq the `cached` name instead, the resolver's best case).
//! - `forwarded`: a fresh name per query (`qN.fwd.test`, dnsmasq answers any), so the sidecar's
//!   cache never has it and every query is forwarded.
//!
//! Modes run interleaved round after round (these machines are noisy); the table shows the
//! median over rounds of each percentile.

mod load;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use interceptor::{
    bpf::{Maps, Pins},
    iptables,
    registry::{PodSource, Registry, spec::PodSpec},
};

pub use self::load::{LoadResult, Query};
use crate::{
    bins,
    lab::{Lab, LabPod, Managed},
};

/// `interceptor-lab dns-bench` options.
#[derive(Debug, clap::Args)]
pub struct DnsBenchArgs {
    /// Rounds (every mode and name kind once per round).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Queries per run (the time limit may end a run first).
    #[arg(long, default_value_t = 5_000)]
    pub queries: u64,
    /// Time limit per run, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub run_seconds: f64,
    /// Where to write `dns-<time>/{results.json,table.md}`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// The names dnsmasq knows.
const CACHED_NAME: &str = "upstream.test";
const FORWARD_DOMAIN: &str = "fwd.test";
const UPSTREAM_IP: &str = "198.18.88.8";
/// The sidecar's mesh name.
const LOCAL_NAME: &str = "reviews.default.svc.cluster.local";
const MESH: &str = "namespace: default
dns:
  ttl: 60s
  upstream_timeout: 1s
  services:
    - name: reviews.default
      addresses: [198.18.77.7]
";

/// Who answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// dnsmasq, asked from a pod without capture.
    Direct,
    /// The sidecar, reached through the eBPF capture.
    Ebpf,
    /// The sidecar, reached through istio-iptables' DNS rules.
    Iptables,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Ebpf, Route::Iptables];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct (dnsmasq)",
            Route::Ebpf => "ebpf capture → sidecar",
            Route::Iptables => "iptables capture → sidecar",
        }
    }
}

/// Which kind of name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Cached,
    Local,
    Forwarded,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Cached, Kind::Local, Kind::Forwarded];

    fn name(self) -> &'static str {
        match self {
            Kind::Cached => "cached",
            Kind::Local => "local",
            Kind::Forwarded => "forwarded",
        }
    }

    /// The query of this kind on `path` (directly, dnsmasq cannot answer the mesh name).
    fn query(self, path: Route) -> Query {
        match (self, path) {
            (Kind::Cached, _) | (Kind::Local, Route::Direct) => Query::Fixed(CACHED_NAME.into()),
            (Kind::Local, _) => Query::Fixed(LOCAL_NAME.into()),
            (Kind::Forwarded, _) => Query::Fresh(FORWARD_DOMAIN.into()),
        }
    }
}

/// One row of the table: medians over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub kind: Kind,
    pub path: Route,
    pub qps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub rounds: Vec<LoadResult>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct DnsReport {
    pub started: String,
    pub kernel: String,
    pub command: String,
    pub queries: u64,
    pub rows: Vec<Row>,
}

/// The pods and processes of the benchmark; everything goes when it is dropped.
struct Rig {
    resolver: LabPod,
    pods: Vec<(Route, LabPod)>,
    exe: PathBuf,
    pins: Pins,
    scratch: PathBuf,
    // Dropped in this order: processes, then the agent, then the pods.
    processes: Vec<Managed>,
    agent: Option<Managed>,
    _lab: Lab,
}

impl Rig {
    fn new() -> Result<Self> {
        let exe = bins::product()?;
        let mut lab = Lab::create("dnsb")?;
        let resolver = lab.add_pod("dns")?;
        let mut pods = Vec::new();
        for path in Route::ALL {
            let short = match path {
                Route::Direct => "direct",
                Route::Ebpf => "ebpf",
                Route::Iptables => "ipt",
            };
            pods.push((path, lab.add_pod(short)?));
        }
        let pins = Pins::new(format!("/sys/fs/bpf/{}", lab.name));
        let scratch = std::env::temp_dir().join(&lab.name);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut rig = Self {
            resolver,
            pods,
            exe,
            pins,
            scratch,
            processes: Vec::new(),
            agent: None,
            _lab: lab,
        };
        rig.start_resolver()?;
        rig.start_agent()?;
        for path in [Route::Ebpf, Route::Iptables] {
            rig.start_sidecar(path)?;
            rig.capture(path)?;
        }
        Ok(rig)
    }

    fn pod(&self, path: Route) -> &LabPod {
        self.pods
            .iter()
            .find_map(|(p, pod)| (*p == path).then_some(pod))
            .unwrap_or(&self.resolver)
    }

    fn resolver_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.resolver.ip), 53)
    }

    fn start_resolver(&mut self) -> Result<()> {
        let child = self
            .resolver
            .spawn(
                super::peers::dnsmasq(&[IpAddr::V4(self.resolver.ip)])
                    .arg(format!("--address=/{CACHED_NAME}/{UPSTREAM_IP}"))
                    .arg(format!("--address=/{FORWARD_DOMAIN}/{UPSTREAM_IP}")),
            )
            .context("starting dnsmasq (apt-get install dnsmasq-base; cargo xtask setup does)")?;
        self.processes.push(Managed::new("dnsmasq", child));
        // Ready when it answers (bounded by load's own timeouts and tries).
        let server = self.resolver_addr();
        let query = Query::Fixed(CACHED_NAME.into());
        for _ in 0..50 {
            let ok = self
                .pod(Route::Direct)
                .run(|| load::run(server, &query, 1, Duration::from_secs(1)))?;
            if ok.errors == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("dnsmasq in {} never answered", self.resolver.name)
    }

    fn start_agent(&mut self) -> Result<()> {
        let mut agent = Managed::new(
            "agent",
            Command::new(&self.exe)
                .arg("--pin-root")
                .arg(self.pins.root())
                .args(["--log-level", "warn", "agent", "--reconcile-seconds", "0.2"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the agent")?,
        );
        agent.wait_for_line("agent ready", Duration::from_secs(60))?;
        self.agent = Some(agent);
        Ok(())
    }

    /// The product's sidecar (it drops to UID 1337 itself), forwarding to the resolver.
    fn start_sidecar(&mut self, path: Route) -> Result<()> {
        let pod = self.pod(path).clone();
        let conf = self.scratch.join(format!("{}-resolv.conf", pod.name));
        std::fs::write(&conf, format!("nameserver {}\n", self.resolver.ip))?;
        let yaml = self.scratch.join(format!("{}-dns.yaml", pod.name));
        std::fs::write(&yaml, MESH)?;
        for f in [&self.scratch, &conf, &yaml] {
            let mode = if f.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        let stderr =
            std::fs::File::create(self.scratch.join(format!("{}-sidecar.stderr", pod.name)))?;
        let child = pod
            .spawn(
                Command::new(&self.exe)
                    .args(["--log-level", "warn", "proxy", "--config"])
                    .arg(&yaml)
                    .arg("--dns-resolv-conf")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(stderr),
            )
            .with_context(|| format!("starting the sidecar in {}", pod.name))?;
        self.processes
            .push(Managed::new(format!("{} sidecar", pod.name), child));
        pod.wait_listening(15021, Duration::from_secs(30), self.processes.last_mut())?;
        Ok(())
    }

    /// DNS capture of the pod's queries to the resolver, in the path's mode.
    fn capture(&mut self, path: Route) -> Result<()> {
        let pod = self.pod(path);
        let mut spec = PodSpec::default();
        spec.dns.enabled = true;
        spec.dns.nameservers = vec![IpAddr::V4(self.resolver.ip)];
        let netns = pod.open_netns()?;
        match path {
            Route::Direct => {}
            Route::Iptables => {
                let backend = iptables::resolve(&netns, iptables::BackendChoice::Auto);
                iptables::apply(&netns, &spec, &iptables::Settings::default(), backend)?;
            }
            Route::Ebpf => {
                let mut maps = Maps::open(&self.pins)?;
                Registry::lock(&self.pins, &mut maps)?.enable(
                    &netns,
                    &PodSource::Netns(pod.netns.clone()),
                    &spec,
                )?;
            }
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.processes.clear();
        if let Some(mut agent) = self.agent.take() {
            agent.stop(Duration::from_secs(20));
        }
        if self.pins.root().exists() {
            let _ = interceptor::bpf::teardown(&self.pins);
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Runs the benchmark.
pub fn run(args: &DnsBenchArgs) -> Result<DnsReport> {
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let rig = Rig::new()?;
    let server = rig.resolver_addr();
    let limit = Duration::from_secs_f64(args.run_seconds);
    let mut results: Vec<(Kind, Route, Vec<LoadResult>)> = Vec::new();
    for kind in Kind::ALL {
        for path in Route::ALL {
            results.push((kind, path, Vec::new()));
        }
    }
    // Warm-up: the sidecars' caches hold the cached name, every path has run once.
    for (kind, path, _) in &results {
        let query = kind.query(*path);
        rig.pod(*path)
            .run(|| load::run(server, &query, 200, limit))?;
    }
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for (kind, path, rounds) in &mut results {
            let query = kind.query(*path);
            let r = rig
                .pod(*path)
                .run(|| load::run(server, &query, args.queries, limit))?;
            rounds.push(r);
        }
    }
    drop(rig);
    let rows = results
        .into_iter()
        .map(|(kind, path, rounds)| Row {
            kind,
            path,
            qps: median(rounds.iter().map(|r| r.qps)),
            p50_us: median(rounds.iter().map(|r| r.p50_us)),
            p99_us: median(rounds.iter().map(|r| r.p99_us)),
            errors: rounds.iter().map(|r| r.errors).sum(),
            rounds,
        })
        .collect();
    Ok(DnsReport {
        started,
        kernel: interceptor::bpf::features::kernel_release(),
        command: std::env::var("INTERCEPTOR_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        queries: args.queries,
        rows,
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl DnsReport {
    /// The table README.md shows: each capture row next to the direct resolver.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "DNS, {} sequential A queries per run over UDP (connected socket), median of {} \
             rounds; kernel {}; started {}.\n",
            self.queries,
            self.rows.first().map_or(0, |r| r.rounds.len()),
            self.kernel,
            self.started
        );
        let _ = writeln!(
            out,
            "| name | path | queries/s | p50 µs | p99 µs | p50 vs direct | errors |\n|---|---|---|---|---|---|---|"
        );
        for row in &self.rows {
            let direct = self
                .rows
                .iter()
                .find(|r| r.kind == row.kind && r.path == Route::Direct)
                .map_or(0.0, |r| r.p50_us);
            let delta = if row.path == Route::Direct {
                "—".to_owned()
            } else {
                format!("{:+.2} µs", row.p50_us - direct)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.2} | {:.1} | {delta} | {} |",
                row.kind.name(),
                row.path.name(),
                row.qps,
                row.p50_us,
                row.p99_us,
                row.errors
            );
        }
        out
    }

    /// Writes `<out>/dns-<time>/{results.json,table.md}`; returns the directory.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        super::write_result_dir(out, "dns-", &self.started, self, &self.markdown())
    }
}
