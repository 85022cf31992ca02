//! `interceptor agent`: loads (or adopts) the datapath, keeps the per-pod state right (inbound
//! listeners, pods that went away), and on exit removes what it attached unless asked to keep it
//! pinned or another agent still uses it.
//!
//! - [`health`]: readiness and the agent's HTTP endpoints (probes, metrics).
//! - [`events`]: the datapath's ring buffer (listen events wake a pass) and its log records.
//! - [`passes`]: what each pass over the pods costs (metrics).

mod brake;
mod events;
mod health;
mod limits;
mod passes;

use std::{
    fs::{self, File, OpenOptions},
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    bpf::{self, Datapath, LoadOptions, Pins, features::Features},
    discovery::held::HeldNamespaces,
    kube::{
        KubeOptions, PodController,
        metrics::KubeMetrics,
        owner::{self, Verdict},
    },
    registry::Registry,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent needs root (it loads eBPF programs and attaches them to the cgroup root)")]
    NotRoot,
    #[error(
        "no cgroup v2 mount found in /proc/self/mounts: mount one (`mount -t cgroup2 none \
         /sys/fs/cgroup`) or pass --cgroup"
    )]
    NoCgroup2,
    #[error(
        "bpffs is not mounted at {0} and mounting it failed ({1}): run `mount -t bpf bpf {0}` \
         (or `cargo xtask setup`)"
    )]
    NoBpffs(&'static str, nix::Error),
    #[error(
        "bpf() refused this process's feature probes: it lacks CAP_SYS_ADMIN (or CAP_BPF and \
         CAP_NET_ADMIN); grant CAP_SYS_ADMIN, which the agent needs for setns() anyway"
    )]
    ProbesRefused,
    #[error(
        "this kernel ({kernel}) lacks what interception needs: {missing}. Interceptor needs \
         Linux >= 5.7 with CONFIG_CGROUP_BPF, CONFIG_BPF_STREAM_PARSER; use iptables mode \
         (`interceptor iptables apply`) on this node"
    )]
    Kernel { kernel: String, missing: String },
    #[error(
        "Linux {kernel} charges BPF maps to RLIMIT_MEMLOCK, which stays at {limit} for this \
         process{hint}; the datapath needs up to {needed}: give the agent CAP_SYS_RESOURCE (it \
         raises the limit itself) or start it with a higher limit (`ulimit -l unlimited`, \
         systemd `LimitMEMLOCK=infinity`)"
    )]
    Memlock {
        kernel: String,
        limit: String,
        needed: String,
        hint: String,
    },
    #[error(transparent)]
    Capabilities(#[from] crate::capabilities::Missing),
    #[error(transparent)]
    Bpf(#[from] bpf::Error),
    #[error(transparent)]
    Pods(#[from] crate::registry::Error),
    #[error(transparent)]
    Kube(#[from] crate::kube::Error),
    #[error("binding the health endpoint {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub pins: Pins,
    pub load: LoadOptions,
    /// Leave programs attached and maps pinned on exit (interception goes on without an agent).
    pub keep_pinned: bool,
    /// Stand by while an agent of an older ABI runs, then migrate (`--wait-for-old-agent`).
    pub wait_for_old_agent: bool,
    /// How often pods are checked (gone namespaces, proxy listeners).
    pub reconcile_every: Duration,
    /// Learn the pods from the Kubernetes API (`--kube`).
    pub kube: Option<KubeOptions>,
    /// Where to serve `/healthz/ready`.
    pub health_addr: Option<SocketAddr>,
    /// What `preflight` probed, recorded for `status` once the datapath runs.
    pub features: Option<Features>,
    /// Where the kernel's TCP memory-pressure state is read each pass (`/proc/net/protocols`;
    /// tests point it at a file of their own), for the sk_msg brake (`agent/brake.rs`).
    pub tcp_pressure_source: PathBuf,
}

pub use brake::{PROTOCOLS, tcp_under_pressure};

/// Checks what the agent needs before touching anything; fixes what it safely can (bpffs).
pub fn preflight(cgroup: Option<&Path>) -> Result<(PathBuf, Features), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    // Root is not enough: a container drops capabilities. Name what is missing before
    // anything is half done.
    let kernel = bpf::features::kernel_release();
    let charges_memlock = limits::kernel_charges_memlock(&kernel);
    let mut needs = crate::capabilities::AGENT.to_vec();
    if limits::memlock_needs_capability(charges_memlock, limits::memlock()) {
        needs.push(crate::capabilities::MEMLOCK);
    }
    crate::capabilities::check("the agent", &needs)?;
    if !bpf::features::bpffs_mounted() {
        let target = bpf::features::BPFFS;
        nix::mount::mount(
            Some("bpf"),
            target,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::NoBpffs(target, e))?;
        info!("mounted bpffs at {target}");
    }
    let cgroup = match cgroup {
        Some(c) => c.to_owned(),
        None => bpf::features::cgroup2_mount().ok_or(Error::NoCgroup2)?,
    };
    let memlock = limits::raise_memlock();
    if charges_memlock && memlock.soft < limits::MEMLOCK_NEEDED {
        // Said now: the probes and maps would fail later on EPERM, which reads as a missing
        // kernel feature.
        return Err(Error::Memlock {
            kernel,
            limit: limits::show(memlock.soft),
            needed: limits::show(limits::MEMLOCK_NEEDED),
            hint: crate::capabilities::denied_hint(
                Some(libc::EPERM),
                crate::capabilities::Capability::SysResource,
            ),
        });
    }
    limits::raise_nofile();
    let features = Features::probe();
    let missing = features.missing_for_outbound();
    if !missing.is_empty() {
        // A refused probe reads as "unsupported": do not blame the kernel for a capability.
        use crate::capabilities::Capability;
        let bpf_ok = Capability::SysAdmin.is_effective() || Capability::Bpf.is_effective();
        let net_ok = Capability::SysAdmin.is_effective() || Capability::NetAdmin.is_effective();
        if !(bpf_ok && net_ok) {
            return Err(Error::ProbesRefused);
        }
        return Err(Error::Kernel {
            kernel: features.kernel.clone(),
            missing: missing.join(", "),
        });
    }
    if !features.inbound() {
        warn!(
            kernel = %features.kernel,
            "sk_lookup is not available (Linux >= 5.9): inbound capture is off on this node"
        );
    }
    Ok((cgroup, features))
}

/// Holds this agent's share of the instance; the last one out may tear the datapath down.
struct Membership {
    lock: Flock<File>,
    pid_file: PathBuf,
    /// Held for the agent's life on its pid file: a file nobody holds is a dead agent's, even
    /// when its pid has been reused (`running_agents`).
    _alive: Flock<File>,
}

/// What this build writes in its pid file; older builds left it empty (and did not lock it).
const PID_FILE_LOCKED: &[u8] = b"locked\n";

impl Membership {
    fn join(pins: &Pins) -> Result<Self, Error> {
        let dir = pins.run_dir();
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { what, path, source }
        };
        fs::create_dir_all(dir.join("agents")).map_err(io("creating", &dir))?;
        let path = dir.join("agent.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| Error::Io {
            what: "locking",
            path: path.clone(),
            source: e.into(),
        })?;
        // Locked under a temporary name, then renamed: nobody sees it unlocked.
        let pid_file = dir.join("agents").join(std::process::id().to_string());
        let tmp = dir
            .join("agents")
            .join(format!(".{}.new", std::process::id()));
        fs::write(&tmp, PID_FILE_LOCKED).map_err(io("writing", &tmp))?;
        let file = File::open(&tmp).map_err(io("opening", &tmp))?;
        let alive =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| Error::Io {
                what: "locking",
                path: tmp.clone(),
                source: e.into(),
            })?;
        fs::rename(&tmp, &pid_file).map_err(io("renaming", &tmp))?;
        Ok(Self {
            lock,
            pid_file,
            _alive: alive,
        })
    }

    /// Whether no other agent holds the instance (turns our shared lock into an exclusive one).
    fn last_one(&self) -> bool {
        // Linux converts a flock by dropping it first: a failed conversion leaves this agent
        // without its share, so call this only on the way out.
        self.lock.relock(FlockArg::LockExclusiveNonblock).is_ok()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Pids of the agents currently running on this instance. A pid file is left behind by an
/// agent that was killed (SIGKILL, OOM), and its pid can be reused by anything: this build's
/// files are live while locked; an older build's (empty, never locked) while its pid runs an
/// `interceptor … agent` command line.
pub fn running_agents(pins: &Pins) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(pins.run_dir().join("agents")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .filter(|(pid, path)| agent_alive(*pid, path))
        .map(|(pid, _)| pid)
        .collect();
    pids.sort_unstable();
    pids
}

fn agent_alive(pid: u32, pid_file: &Path) -> bool {
    let Ok(file) = File::open(pid_file) else {
        return false;
    };
    let mut head = [0; PID_FILE_LOCKED.len()];
    let n = std::io::Read::read(&mut &file, &mut head).unwrap_or(0);
    if &head[..n] == PID_FILE_LOCKED {
        // Ours: live exactly while its agent holds the lock (the probe's lock, if it is taken,
        // goes with `file` at once).
        return Flock::lock(file, FlockArg::LockSharedNonblock).is_err();
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let program = args.next().unwrap_or_default();
    let name = program.rsplit(|&b| b == b'/').next().unwrap_or_default();
    name.starts_with(b"interceptor") && args.any(|a| a == b"agent")
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // Watched on a task of its own: a pass runs on this thread without awaiting, so the select
    // below sees a signal only between passes. A pass looks at `stop` between pods instead
    // (an agent collecting 10 000 pods whose namespaces had gone did not exit within 20 s of
    // SIGTERM in the node-scale benchmark; Kubernetes waits 30 s before SIGKILL).
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            info!("stopping");
            stop.cancel();
        }
    });
    let mut registry = MetricsRegistry::with_prefix("interceptor_agent");
    let ready = health::Readiness::new(&mut registry);
    let stop_health = CancellationToken::new();
    let kube_metrics = KubeMetrics::new(&mut registry);
    let pass_metrics = passes::PassMetrics::new(&mut registry);
    if let Some(addr) = opts.health_addr {
        health::serve(addr, ready.clone(), Arc::new(registry), stop_health.clone()).await?;
    }
    // Before touching the datapath: a bad kubeconfig fails the start, not the first pass.
    let client = match &opts.kube {
        Some(k) => Some(crate::kube::client(k).await?),
        None => None,
    };
    // Kept to ask, at stop time, whether the stop is an uninstall.
    let owner_check = match (&client, &opts.kube) {
        // --keep-pinned never uninstalls: nothing to ask.
        _ if opts.keep_pinned => None,
        (
            Some(c),
            Some(KubeOptions {
                daemonset: Some(ds),
                ..
            }),
        ) => Some(owner::OwnerWatch::start(c.clone(), ds.clone())),
        _ => None,
    };
    let membership = Membership::join(&opts.pins)?;
    let Some(mut datapath) = start_datapath(&opts, &ready, &stop).await? else {
        // Stopped while standing by: an uninstall (both pods of a surge stopped at once) is
        // still one; the old agent, if it is still there, decides instead (`last_one`).
        stop_health.cancel();
        if exit_decision(&opts, owner_check).await.is_none() && membership.last_one() {
            uninstall(&opts.pins)?;
        }
        return Ok(());
    };
    if let Some(features) = &opts.features
        && let Err(err) = features.record(&opts.pins)
    {
        debug!(%err, "could not record the kernel features for status");
    }

    let logs = events::start_logs(&mut datapath);
    let mut event_ring = events::open_events(&opts.pins);
    let mut controller = match (client, &opts.kube) {
        (Some(client), Some(k)) => {
            info!(node = %k.node_name, "watching this node's pods in the Kubernetes API");
            Some(PodController::start(client, k, kube_metrics))
        }
        _ => None,
    };
    let kube_changed = controller.as_ref().map(|c| c.watch.notifier());

    // Pods' namespaces, held open between passes (see `discovery::held`).
    let mut held = HeldNamespaces::default();
    if let Err(err) =
        Registry::lock(&datapath.pins, &mut datapath.maps).map(|mut r| r.drop_orphan_rows())
    {
        warn!(%err, "looking for rows left under free pod ids");
    }
    // Pods enabled while no agent ran (or by a previous one) may have new proxies.
    reconcile(&mut datapath, &mut held, &pass_metrics, &stop);

    let mut brake = brake::Brake::new(opts.tcp_pressure_source.clone());
    brake.check(&mut datapath.maps);

    let mut tick = tokio::time::interval(opts.reconcile_every);
    loop {
        // Ready once pinned and, with --kube, once the first complete list has been applied.
        if !ready.get() && controller.as_ref().is_none_or(|c| c.watch.synced()) {
            if let Some(c) = controller.as_mut() {
                kube_pass(c, &mut datapath, &stop);
            }
            ready.set(true);
            info!(
                root = %opts.pins.root().display(),
                attached = ?datapath.attached,
                "agent ready"
            );
            // A line scripts and tests wait for.
            println!(
                "interceptor agent ready (pin root {})",
                opts.pins.root().display()
            );
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                brake.check(&mut datapath.maps);
                reconcile(&mut datapath, &mut held, &pass_metrics, &stop);
                if let Some(c) = controller.as_mut() {
                    kube_pass(c, &mut datapath, &stop);
                }
            }
            _ = notified(kube_changed.as_deref()) => {
                if let Some(c) = controller.as_mut() {
                    kube_pass(c, &mut datapath, &stop);
                }
            }
            listeners = events::next_event(&mut event_ring) => {
                if !listeners.is_empty() {
                    // A proxy started listening: match it to its pod right away.
                    if let Err(err) = Registry::lock(&datapath.pins, &mut datapath.maps)
                        .and_then(|r| r.until(&stop).resolve_new_listeners(&listeners))
                    {
                        warn!(%err, "resolving inbound listeners");
                    }
                }
            }
        }
    }
    let stopping = std::time::Instant::now();
    ready.set(false);
    stop_health.cancel();
    drop(controller);
    // Closing the pods' namespaces (one descriptor each) is the kernel's work, not a walk.
    drop(held);

    if let Some(logs) = logs {
        logs.abort();
    }
    let pins = datapath.pins.clone();
    drop(datapath);
    let keep = exit_decision(&opts, owner_check).await;
    if let Some(why) = keep {
        info!(root = %pins.root().display(), "keeping the datapath pinned and attached: {why}");
    } else if membership.last_one() {
        uninstall(&pins)?;
    } else {
        info!("another agent still uses the datapath; leaving it attached");
    }
    drop(membership);
    info!(seconds = stopping.elapsed().as_secs_f64(), "agent stopped");
    Ok(())
}

/// Why this stop keeps the datapath; None: it is an uninstall.
async fn exit_decision(
    opts: &AgentOptions,
    owner_check: Option<owner::OwnerWatch>,
) -> Option<String> {
    match (opts.keep_pinned, &opts.kube) {
        (true, _) => Some("--keep-pinned".to_owned()),
        (false, None) => None,
        (false, Some(_)) => match owner_check {
            None => Some(
                "Kubernetes mode without --daemonset: a stop is never an uninstall \
                 (`interceptor uninstall` removes the datapath)"
                    .to_owned(),
            ),
            Some(watched) => {
                let ds = watched.owner();
                match watched.check(OWNER_CHECK_TIMEOUT).await {
                    Verdict::Present => Some(format!(
                        "DaemonSet {ds} still exists: this stop is a restart or rollout"
                    )),
                    Verdict::Unknown(err) => Some(format!(
                        "could not ask the API about DaemonSet {ds} ({err}) and its watch saw no \
                         deletion; keeping the pods intercepted (`interceptor uninstall` removes \
                         the datapath)"
                    )),
                    Verdict::Uninstalling(why) => {
                        info!(daemonset = %ds, "{why}: uninstalling from this node");
                        None
                    }
                }
            }
        },
    }
}

/// Starts the datapath; with `--wait-for-old-agent`, a migration refused because the older
/// ABI's agent still runs is tried again every second meanwhile. During that wait this agent is
/// ready (the old datapath serves every pod, and a rolling update with `maxSurge` stops the
/// old pod only once the new one is ready) and touches nothing. None: stopped while waiting.
async fn start_datapath(
    opts: &AgentOptions,
    ready: &health::Readiness,
    stop: &CancellationToken,
) -> Result<Option<Datapath>, Error> {
    let mut waiting_since: Option<std::time::Instant> = None;
    let mut warned = false;
    let others_run = || {
        running_agents(&opts.pins)
            .into_iter()
            .any(|pid| pid != std::process::id())
    };
    loop {
        // While standing by, start again (and so run `migrate::recover`, which renames staged
        // pins) only once the old agent is gone.
        let standing_by = waiting_since.is_some() && others_run();
        if !standing_by {
            match Datapath::start(opts.pins.clone(), &opts.load) {
                Err(bpf::Error::MigrationWhileRunning { found, pids, .. })
                    if opts.wait_for_old_agent =>
                {
                    if waiting_since.is_none() {
                        info!(
                            found,
                            expected = interceptor_common::ABI_VERSION,
                            old_agents = %pids,
                            "the pinned datapath is of an older ABI and its agent still runs: \
                             standing by (ready; the old datapath serves) until it stops, then \
                             migrating"
                        );
                        // A line scripts and tests wait for.
                        println!("interceptor agent standing by for the old agent ({pids})");
                        ready.set(true);
                        waiting_since = Some(std::time::Instant::now());
                    }
                }
                Ok(datapath) => {
                    if waiting_since.is_some() {
                        // Ready again once this agent's own first pass is done.
                        ready.set(false);
                    }
                    return Ok(Some(datapath));
                }
                Err(err) => return Err(err.into()),
            }
        }
        if !warned && waiting_since.is_some_and(|t| t.elapsed() >= STANDBY_WARN_AFTER) {
            warned = true;
            // A rollout stops the old pod within seconds of this one's readiness: not ready
            // any more, so that a rollout stalls where it can be seen.
            ready.set(false);
            warn!(
                "still standing by for the old agent after {STANDBY_WARN_AFTER:?}: not ready; \
                 stop it to let this one migrate the datapath"
            );
        }
        tokio::select! {
            _ = stop.cancelled() => {
                info!("stopped while standing by: the old agent's datapath is untouched");
                return Ok(None);
            }
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
        }
    }
}

const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// A rollout stops the old pod within seconds of the new one's readiness; longer means
/// something else runs an agent here.
const STANDBY_WARN_AFTER: Duration = Duration::from_secs(600);

/// How long a stopping agent waits for the API's answer about its DaemonSet.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Removes everything the datapath put on this node: the iptables chains of iptables-mode pods,
/// then every program, link and map (pins and sk_lookup links included). Returns how many
/// iptables-mode pods had rules removed.
pub fn uninstall(pins: &Pins) -> Result<usize, Error> {
    let mut removed = 0;
    if pins.root().exists() {
        match bpf::Maps::open(pins) {
            Ok(mut maps) => {
                match Registry::lock(pins, &mut maps).and_then(|mut r| r.remove_all_iptables()) {
                    Ok(n) => {
                        removed = n;
                        if n > 0 {
                            info!(pods = n, "removed the iptables rules of iptables-mode pods");
                        }
                    }
                    Err(err) => warn!(%err, "removing iptables-mode pods' rules"),
                }
            }
            Err(err) => warn!(%err, "pinned maps unreadable; removing the pins anyway"),
        }
    }
    bpf::teardown(pins)?;
    Ok(removed)
}

/// One pass of the Kubernetes controller. It stats /proc and enters namespaces: blocking work,
/// so the runtime is told to move other tasks (the watches) off this thread meanwhile.
fn kube_pass(controller: &mut PodController, datapath: &mut Datapath, stop: &CancellationToken) {
    tokio::task::block_in_place(|| {
        controller.reconcile(&datapath.pins, &mut datapath.maps, stop);
    });
}

async fn notified(notify: Option<&Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

fn reconcile(
    datapath: &mut Datapath,
    held: &mut HeldNamespaces,
    metrics: &passes::PassMetrics,
    stop: &CancellationToken,
) {
    if stop.is_cancelled() {
        return;
    }
    let started = std::time::Instant::now();
    let result = Registry::lock(&datapath.pins, &mut datapath.maps).and_then(|registry| {
        let mut registry = registry.until(stop);
        registry.collect_gone_held(held)?;
        registry.resolve_listeners(false)?;
        Ok(registry.infos().len())
    });
    if let Ok(pods) = &result {
        metrics.observe(started.elapsed(), *pods);
    }
    if let Err(err) = result {
        warn!(%err, "reconciling pods");
    }
}
