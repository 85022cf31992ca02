//! One benchmark topology in one interception mode: a client pod and a server pod (network
//! namespaces + veth + cgroups, see `lab`), the server app, a sidecar (this binary's proxy) in
//! each pod unless the mode is `direct`, and the interception itself. Everything is torn down
//! when the rig is dropped, whatever happened.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use interceptor::{
    bpf::{Maps, Pins},
    iptables,
    registry::{PodSource, Registry, spec::PodSpec},
};

use super::peers::{self, App, Sidecar};
use crate::{
    bins,
    lab::{Lab, LabPod, Managed},
};

/// How the pods' traffic reaches their sidecars.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No sidecars, no interception: the floor.
    Direct,
    /// istio-iptables' rules (nat REDIRECT, conntrack for SO_ORIGINAL_DST).
    Iptables,
    /// The eBPF datapath: connect4, sockops + sk_msg, sk_lookup, getsockopt.
    Ebpf,
    /// The eBPF datapath with the sk_msg redirect off: the app↔proxy hop is loopback TCP.
    EbpfNoSkmsg,
    /// The eBPF datapath with `--msg-redirect-policy always` (the default, spelled out): every
    /// app↔proxy connection joins the sockhash. (Results of 2026-12-07T07:15 and T07:38 ran
    /// when `ebpf` was the adaptive policy.)
    EbpfAlways,
    /// The eBPF datapath with `--msg-redirect-policy adaptive`.
    EbpfAdaptive,
}

impl Mode {
    /// The default modes of a run.
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Ebpf, Mode::EbpfNoSkmsg];
    /// Every mode, in the order reports list them.
    pub const REPORTED: [Mode; 6] = [
        Mode::Direct,
        Mode::Iptables,
        Mode::Ebpf,
        Mode::EbpfAlways,
        Mode::EbpfAdaptive,
        Mode::EbpfNoSkmsg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
            Mode::EbpfNoSkmsg => "ebpf-no-skmsg",
            Mode::EbpfAlways => "ebpf-always",
            Mode::EbpfAdaptive => "ebpf-adaptive",
        }
    }

    fn ebpf(self) -> bool {
        matches!(
            self,
            Mode::Ebpf | Mode::EbpfNoSkmsg | Mode::EbpfAlways | Mode::EbpfAdaptive
        )
    }
}

/// What the rig runs in its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload<'a> {
    /// The HTTP app in the server pod, sidecars in both pods; the app serves `/bytes/N` for
    /// each of `sizes`.
    Http {
        app: App,
        sidecar: Sidecar,
        sizes: &'a [usize],
    },
    /// A sink on the client pod's 15001 in place of its sidecar: isolates the app↔proxy hop.
    HopSink,
}

pub(super) const APP_PORT: u16 = 8080;
const SINK_PORT: u16 = 15001;

pub struct Rig {
    pub mode: Mode,
    pub client: LabPod,
    pub server: LabPod,
    /// The product binary (agent, proxy) and this lab's (test apps).
    exe: PathBuf,
    lab_exe: PathBuf,
    // Dropped in reverse order of creation: processes, then the agent, then the pods.
    processes: Vec<Managed>,
    agent: Option<Managed>,
    pins: Pins,
    /// Configs of the third-party peers; removed on drop.
    scratch: PathBuf,
    _lab: Lab,
}

impl Rig {
    pub fn new(
        mode: Mode,
        workload: Workload<'_>,
        tag: &str,
        agent_args: &[String],
    ) -> Result<Self> {
        Self::with_exe(bins::product()?, mode, workload, tag, agent_args)
    }

    /// As `new`, with `exe` as the `interceptor` binary (tests run from another binary).
    pub fn with_exe(
        exe: PathBuf,
        mode: Mode,
        workload: Workload<'_>,
        tag: &str,
        agent_args: &[String],
    ) -> Result<Self> {
        let lab_exe = bins::lab()?;
        let mut lab = Lab::create(tag)?;
        let client = lab.add_pod("client")?;
        let server = lab.add_pod("server")?;
        let pins = Pins::new(format!("/sys/fs/bpf/{}", lab.name));
        let scratch = std::env::temp_dir().join(&lab.name);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut rig = Self {
            mode,
            client,
            server,
            exe,
            lab_exe,
            processes: Vec::new(),
            agent: None,
            pins,
            scratch,
            _lab: lab,
        };
        if mode.ebpf() {
            rig.start_agent(agent_args)?;
        }
        match workload {
            Workload::Http {
                app,
                sidecar,
                sizes,
            } => rig.start_http(app, sidecar, sizes)?,
            Workload::HopSink => rig.start_sink()?,
        }
        Ok(rig)
    }

    /// Where the load generator sends its requests.
    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::from((self.server.ip, APP_PORT))
    }

    /// Where the stream writer connects: any address outside the pod is captured to the sink;
    /// `direct` talks to the sink itself over loopback TCP.
    pub fn stream_target(&self) -> SocketAddr {
        match self.mode {
            Mode::Direct => SocketAddr::from((Ipv4Addr::LOCALHOST, SINK_PORT)),
            _ => SocketAddr::from((self.server.ip, 9)),
        }
    }

    /// The lab binary, which runs the test apps (`testapp …`).
    pub fn lab_exe(&self) -> &PathBuf {
        &self.lab_exe
    }

    /// Every datapath counter by name (eBPF modes).
    pub fn counters(&self) -> Result<std::collections::BTreeMap<&'static str, u64>> {
        Ok(Maps::open(&self.pins)?.counters()?)
    }

    /// The non-zero `msg_*`, `sockhash_*` and `pod_to_pod_*` datapath counters, for the run
    /// log (what sockops and the sk_msg program decided during this rig's runs).
    pub fn counter_summary(&self) -> String {
        let counters = match Maps::open(&self.pins).and_then(|m| m.counters()) {
            Ok(c) => c,
            Err(err) => return format!("unreadable ({err})"),
        };
        counters
            .iter()
            .filter(|(name, v)| {
                **v > 0
                    && (name.starts_with("msg_")
                        || name.starts_with("sockhash")
                        || name.starts_with("pod_to_pod"))
            })
            .map(|(name, v)| format!("{name}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The datapath instance the rig's agent runs (eBPF modes).
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The agent's pid (eBPF modes).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().and_then(Managed::pid)
    }

    /// Every process the rig started (the agent too), by pid.
    pub fn pids(&self) -> Vec<u32> {
        self.processes
            .iter()
            .chain(self.agent.as_ref())
            .filter_map(Managed::pid)
            .collect()
    }

    /// The pid of the process the rig started as `name` (e.g. "client sidecar").
    pub fn process_pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .and_then(Managed::pid)
    }

    pub fn exe(&self) -> &PathBuf {
        &self.exe
    }

    /// Stops the agent (SIGTERM; SIGKILL after `grace`) and starts another with `extra`
    /// (the arguments `new` takes). Returns how long the old one took from SIGTERM to its exit
    /// and whether it exited by itself within `grace`.
    pub fn restart_agent(&mut self, extra: &[String], grace: Duration) -> Result<(Duration, bool)> {
        let (took, clean) = self.stop_agent(grace);
        self.start_agent(extra)?;
        Ok((took, clean))
    }

    /// Stops the agent (SIGTERM; SIGKILL after `grace`): how long from SIGTERM to its exit,
    /// and whether it exited by itself within `grace`.
    pub fn stop_agent(&mut self, grace: Duration) -> (Duration, bool) {
        let Some(mut agent) = self.agent.take() else {
            return (Duration::ZERO, true);
        };
        let started = std::time::Instant::now();
        let status = agent.stop(grace);
        let took = started.elapsed();
        (took, took < grace && status.is_some_and(|s| s.success()))
    }

    fn start_agent(&mut self, extra: &[String]) -> Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--pin-root")
            .arg(self.pins.root())
            .args(["--log-level", "warn", "agent"]);
        // Fast passes unless the caller sets its own (the scale benchmark runs the default).
        if !extra.iter().any(|a| a == "--reconcile-seconds") {
            cmd.args(["--reconcile-seconds", "0.2"]);
        }
        if self.mode == Mode::EbpfNoSkmsg {
            cmd.arg("--no-msg-redirect");
        }
        if self.mode == Mode::EbpfAlways {
            cmd.args(["--msg-redirect-policy", "always"]);
        }
        if self.mode == Mode::EbpfAdaptive {
            cmd.args(["--msg-redirect-policy", "adaptive"]);
        }
        cmd.args(extra);
        let mut agent = Managed::new(
            "agent",
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the agent")?,
        );
        agent.wait_for_line("agent ready", Duration::from_secs(60))?;
        self.agent = Some(agent);
        Ok(())
    }

    fn spawn(&mut self, pod: Pod, name: &str, args: &[&str], ready: &str) -> Result<()> {
        // Test apps come from the lab binary, the sidecar from the product.
        let exe = if args.first() == Some(&"testapp") {
            &self.lab_exe
        } else {
            &self.exe
        };
        let mut cmd = Command::new(exe);
        cmd.args(["--log-level", "warn"]).args(args);
        self.spawn_command(pod, name, &mut cmd, ready)
    }

    /// Where the stderr of process `name` in pod `pod_name` goes.
    fn stderr_path(&self, pod_name: &str, name: &str) -> PathBuf {
        self.scratch
            .join(format!("{pod_name}-{name}.stderr").replace(' ', "-"))
    }

    /// Starts `cmd` in `pod`; waits for `ready` on its stdout unless empty.
    fn spawn_command(
        &mut self,
        pod: Pod,
        name: &str,
        cmd: &mut Command,
        ready: &str,
    ) -> Result<()> {
        let pod = match pod {
            Pod::Client => &self.client,
            Pod::Server => &self.server,
        };
        // Its stderr goes to a file in the scratch directory: a process that dies or never
        // listens can then say why (see `start_sidecar`).
        let stderr = std::fs::File::create(self.stderr_path(&pod.name, name))
            .with_context(|| format!("creating the stderr file of {name}"))?;
        let mut child = Managed::new(
            format!("{} {name}", pod.name),
            pod.spawn(cmd.stdout(Stdio::piped()).stderr(stderr))
                .with_context(|| format!("starting {name} in {}", pod.name))?,
        );
        if !ready.is_empty() {
            child.wait_for_line(ready, Duration::from_secs(30))?;
        }
        self.processes.push(child);
        Ok(())
    }

    fn start_http(&mut self, app: App, sidecar: Sidecar, sizes: &[usize]) -> Result<()> {
        let listen = self.app_addr();
        match app {
            App::Testapp => self.spawn(
                Pod::Server,
                "app",
                &[
                    "testapp",
                    "http-server",
                    "--listen",
                    &listen.to_string(),
                    "--name",
                    "bench",
                ],
                "listening",
            )?,
            App::Nginx => {
                let conf = peers::nginx_config(&self.scratch.join("nginx"), listen, sizes)?;
                let mut cmd = Command::new("nginx");
                cmd.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
                self.spawn_command(Pod::Server, "nginx", &mut cmd, "")?;
                self.wait_tcp(Pod::Server, listen)?;
            }
        }
        if self.mode == Mode::Direct {
            return Ok(());
        }
        for pod in [Pod::Client, Pod::Server] {
            self.start_sidecar(pod, sidecar)?;
        }
        // Experiment (issue 15): ICPT_BENCH_SERVER_ONLY=1 intercepts only the server pod (the
        // client sidecar still runs, unused): the load generator reaches the server pod directly.
        if std::env::var_os("ICPT_BENCH_SERVER_ONLY").is_some() {
            self.intercept(&[Pod::Server], &PodSpec::default())?;
        } else {
            self.intercept(&[Pod::Client, Pod::Server], &PodSpec::default())?;
        }
        let timeout = Duration::from_secs(20);
        if self.mode.ebpf()
            && !crate::lab::wait_inbound_ready(&self.pins, &self.server.netns, timeout)?
        {
            bail!("the server sidecar's inbound listener was not registered within 20s");
        }
        Ok(())
    }

    fn start_sidecar(&mut self, pod: Pod, sidecar: Sidecar) -> Result<()> {
        let ready_port = match sidecar {
            Sidecar::Interceptor => {
                self.spawn(pod, "sidecar", &["proxy"], "")?;
                15021
            }
            Sidecar::Haproxy => {
                let dir = self.scratch.join(format!("haproxy-{}", pod.name()));
                std::fs::create_dir_all(&dir)?;
                let cfg = peers::haproxy_config(&dir, 15001, 15006)?;
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db").arg("-f").arg(&cfg);
                self.spawn_command(pod, "haproxy", &mut cmd, "")?;
                15001
            }
            Sidecar::Asyncio => {
                let script = peers::asyncio_script(&self.scratch)?;
                // setpriv, not Command::uid: the pod's setns must run before the UID drop.
                let id = peers::PROXY_ID.to_string();
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    "--reuid",
                    &id,
                    "--regid",
                    &id,
                    "--clear-groups",
                    peers::PYTHON,
                    "-u",
                ])
                .arg(&script);
                self.spawn_command(pod, "asyncio proxy", &mut cmd, "asyncio proxy listening")?;
                15001
            }
        };
        let lab_pod = match pod {
            Pod::Client => &self.client,
            Pod::Server => &self.server,
        };
        // The sidecar just started is the last process; an early exit is reported as such.
        let waited = lab_pod.wait_listening(
            ready_port,
            Duration::from_secs(30),
            self.processes.last_mut(),
        );
        if let Err(err) = waited {
            let name = self.processes.last().map_or("", |p| p.name.as_str());
            let short = name.split_once(' ').map_or(name, |(_, n)| n);
            let stderr =
                std::fs::read_to_string(self.stderr_path(&lab_pod.name, short)).unwrap_or_default();
            let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
            bail!(
                "{err}; its stderr (last lines): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts connections from inside `pod`.
    fn wait_tcp(&self, pod: Pod, addr: SocketAddr) -> Result<()> {
        let pod = match pod {
            Pod::Client => &self.client,
            Pod::Server => &self.server,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let up = pod.run(|| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("nothing listened on {addr} in {} within 20s", pod.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_sink(&mut self) -> Result<()> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, SINK_PORT)).to_string();
        self.spawn(
            Pod::Client,
            "sink",
            &["testapp", "sink", "--listen", &listen],
            "listening",
        )?;
        if self.mode == Mode::Direct {
            return Ok(());
        }
        // Outbound only: the hop under test is app → 15001.
        let spec = PodSpec {
            include_inbound_ports: interceptor::registry::spec::Selection::List(Vec::new()),
            ..PodSpec::default()
        };
        self.intercept(&[Pod::Client], &spec)
    }

    fn intercept(&mut self, pods: &[Pod], spec: &PodSpec) -> Result<()> {
        for pod in pods {
            let pod = match pod {
                Pod::Client => &self.client,
                Pod::Server => &self.server,
            };
            let netns = pod.open_netns()?;
            match self.mode {
                Mode::Direct => {}
                Mode::Iptables => {
                    let backend = iptables::resolve(&netns, iptables::BackendChoice::Auto);
                    iptables::apply(&netns, spec, &iptables::Settings::default(), backend)?;
                }
                Mode::Ebpf | Mode::EbpfNoSkmsg | Mode::EbpfAlways | Mode::EbpfAdaptive => {
                    let mut maps = Maps::open(&self.pins)?;
                    Registry::lock(&self.pins, &mut maps)?.enable(
                        &netns,
                        &PodSource::Netns(pod.netns.clone()),
                        spec,
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Pod {
    Client,
    Server,
}

impl Pod {
    fn name(self) -> &'static str {
        match self {
            Pod::Client => "client",
            Pod::Server => "server",
        }
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
