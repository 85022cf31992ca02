//! The command line: `interceptor agent | proxy | pod | status | iptables`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    bpf::pins::DEFAULT_ROOT,
    iptables::BackendChoice,
    registry::{
        Mode,
        spec::{self, PodSpec, SpecError, Switch},
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "interceptor",
    version,
    about = "eBPF traffic interception for sidecar service meshes",
    long_about = "Routes every connection of a meshed pod through its local proxy, like \
                  istio-iptables, but in the kernel: cgroup/connect4, sockops, sk_msg over a \
                  sockhash, sk_lookup and cgroup/getsockopt."
)]
pub struct Cli {
    /// Where this instance pins its maps, programs and links on bpffs.
    #[arg(long, global = true, env = "INTERCEPTOR_PIN_ROOT", default_value = DEFAULT_ROOT)]
    pub pin_root: PathBuf,
    /// Log level (also RUST_LOG, which wins when set).
    #[arg(long, global = true, default_value = "info", env = "INTERCEPTOR_LOG")]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the datapath, keep the per-pod state right; runs until SIGINT/SIGTERM.
    Agent(AgentArgs),
    /// Run the sidecar proxy (outbound 15001, inbound 15006, metrics 15090, health 15021).
    Proxy(ProxyArgs),
    /// Enable, disable and list intercepted pods (talks to the pinned maps).
    #[command(subcommand)]
    Pod(PodCommand),
    /// Show what is attached, the pods, and every datapath counter.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Apply or remove the iptables interception istio-iptables writes (fallback and baseline).
    #[command(subcommand)]
    Iptables(IptablesCommand),
    /// Remove everything interceptor put on this node: programs, links, pins, the sk_lookup
    /// links of pods, and the iptables chains of iptables-mode pods. Stop the agent first.
    Uninstall {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// cgroup v2 directory to attach to (default: the cgroup v2 root, found in /proc/mounts).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The proxy's outbound capture port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The proxy's inbound capture port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Carry the app↔proxy hop over loopback TCP instead of sk_msg (for comparisons).
    #[arg(long)]
    pub no_msg_redirect: bool,
    /// Which connections sk_msg carries: `always` redirects every one; `adaptive` leaves a
    /// connection on loopback TCP when its pod and destination port's recent connections
    /// closed after a few messages. Not the default: it did not measure better (README, issue
    /// 15 item 2), and a keep-alive connection opened right after a burst of short ones stays
    /// on TCP for its whole life.
    #[arg(long, value_enum, default_value_t = MsgRedirectPolicy::Always)]
    pub msg_redirect_policy: MsgRedirectPolicy,
    /// Where the agent reads the kernel's TCP memory-pressure state for the sk_msg brake (the
    /// `press` column of the TCP rows). Tests point it at a file of their own.
    #[arg(long, hide = true, default_value = crate::agent::PROTOCOLS)]
    pub tcp_pressure_source: PathBuf,
    /// Keep the sidecar→sidecar hop of two enabled pods of this node on TCP over the veths
    /// (sk_msg then only carries each pod's app↔proxy hops; for comparisons).
    #[arg(long)]
    pub no_pod_to_pod: bool,
    /// Leave Nagle's algorithm as the app set it on the app↔proxy and proxy→app hops of
    /// enabled pods. By default both ends of those in-pod hops get TCP_NODELAY when they are
    /// established: a hop left on loopback TCP (--no-sockmap, the adaptive policy, a lost
    /// first-write race) otherwise holds a corked app's last segment for the proxy's delayed
    /// ACK, 40 ms (README, issue 15); a redirected hop never delays writes anyway.
    #[arg(long)]
    pub no_app_nodelay: bool,
    /// Leave programs attached and maps pinned on exit: interception goes on without an agent.
    /// (Always so with --kube: there a stop is not an uninstall, see --daemonset.)
    #[arg(long)]
    pub keep_pinned: bool,
    /// Replace pinned state written by an incompatible version instead of refusing to start.
    #[arg(long)]
    pub replace: bool,
    /// When the pinned datapath is of an older ABI and its agent still runs (a rolling update
    /// with `maxSurge`: the old pod leaves only once this one is ready), stand by — ready, the
    /// old datapath serving — and migrate as soon as the old agent has stopped, instead of
    /// exiting with an error. The chart and the manifest set it.
    #[arg(long, env = "INTERCEPTOR_WAIT_FOR_OLD_AGENT")]
    pub wait_for_old_agent: bool,
    /// Level of the eBPF programs' own log records.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Warn)]
    pub bpf_log_level: BpfLogLevel,
    /// Seconds between checks of the pods (gone namespaces, proxy listeners).
    #[arg(long, default_value_t = 1.0)]
    pub reconcile_seconds: f64,
    /// Learn which pods of this node to intercept, and how, from the Kubernetes API (Istio's
    /// annotations and namespace labels, `interceptor.dev/mode`): the DaemonSet mode.
    #[arg(long)]
    pub kube: bool,
    /// kubeconfig for --kube (default: the in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// The DaemonSet running this agent (NAMESPACE/NAME; the chart sets it). With --kube a stop
    /// keeps the datapath working for the next agent — a rollout, `kubectl delete pod`, an OOM
    /// kill — unless this DaemonSet is gone or being deleted: then the stop is an uninstall and
    /// removes everything (programs, pins, iptables-mode rules).
    #[arg(long, env = "INTERCEPTOR_DAEMONSET", requires = "kube")]
    pub daemonset: Option<crate::kube::owner::DaemonSetRef>,
    /// With --kube: capture every meshed pod's DNS to its proxy's 15053 (meshConfig's
    /// `proxyMetadata.ISTIO_META_DNS_CAPTURE: "true"`); a pod's `proxy.istio.io/config` wins.
    #[arg(long, requires = "kube")]
    pub dns_capture: bool,
    /// This node's name: --kube watches the pods with spec.nodeName equal to it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Serve GET /healthz/ready here: 200 once the datapath is pinned and, with --kube, the
    /// first list of pods and namespaces is in; 503 before. (/healthz/live: 200 while running.)
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MsgRedirectPolicy {
    Always,
    Adaptive,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BpfLogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl From<BpfLogLevel> for aya_log::Level {
    fn from(l: BpfLogLevel) -> Self {
        match l {
            BpfLogLevel::Error => aya_log::Level::Error,
            BpfLogLevel::Warn => aya_log::Level::Warn,
            BpfLogLevel::Info => aya_log::Level::Info,
            BpfLogLevel::Debug => aya_log::Level::Debug,
        }
    }
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// IPv6 outbound listener ("none" to skip).
    #[arg(long, default_value = "[::1]:15001")]
    pub outbound_v6: String,
    #[arg(long, default_value = "[::]:15006")]
    pub inbound: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15090")]
    pub metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// Admin endpoint: /config_dump, /clusters, /stats, /ready (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Routing config (YAML; see examples/proxy/). Reloaded on change and on SIGHUP. Without
    /// it every destination is passed through to its original address.
    #[arg(long, env = "INTERCEPTOR_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate FILE and exit: 0 when valid, 1 with the line and field of the first error.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// With --check-config: print the effective config (defaults filled in) as JSON.
    #[arg(long, requires = "check_config")]
    pub json: bool,
    /// Seconds between checks of the config file for changes.
    #[arg(long, default_value_t = 1.0)]
    pub config_poll_seconds: f64,
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Run as this UID when started as root (the identity interception leaves alone).
    #[arg(long, default_value_t = 1337)]
    pub uid: u32,
    #[arg(long, default_value_t = 1337)]
    pub gid: u32,
    /// Keep running as the starting user, and skip the check that the proxy runs as an
    /// identity interception exempts (for a proxy run outside interception, e.g. benchmarks).
    #[arg(long)]
    pub no_drop_privileges: bool,
    /// Upstream connect timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// How long open connections get to finish on SIGTERM, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// The DNS proxy, UDP and TCP, where DNS capture sends a pod's port-53 traffic ("none" to
    /// skip). Names of the config's `dns` section are answered, the rest forwarded.
    #[arg(long, default_value = "127.0.0.1:15053")]
    pub dns: String,
    /// The DNS proxy's IPv6 address ("none" to skip; skipped anyway without IPv6).
    #[arg(long, default_value = "[::1]:15053")]
    pub dns_v6: String,
    /// Where the DNS proxy finds the nameservers for UDP queries (TCP ones go to the
    /// connection's original destination).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// Nameserver (IP:port) to forward to instead of resolv.conf's; repeat for more.
    #[arg(long)]
    pub dns_upstream: Vec<SocketAddr>,
}

/// An optional address flag: "none" or "" = off.
pub fn optional_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        "none" | "" => Ok(None),
        s => s
            .parse()
            .map(Some)
            .map_err(|err| anyhow::anyhow!("{flag} {s:?}: {err} (an IP:port, or none)")),
    }
}

#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Start intercepting a pod's traffic (again: update its settings).
    Enable(PodEnableArgs),
    /// Stop intercepting a pod and remove its entries.
    Disable(PodSelector),
    /// List the intercepted pods.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PodTarget {
    /// A network namespace made with `ip netns add`.
    #[arg(long)]
    pub netns: Option<String>,
    /// A process inside the pod.
    #[arg(long)]
    pub pid: Option<u32>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PodSelector {
    #[arg(long)]
    pub netns: Option<String>,
    #[arg(long)]
    pub pid: Option<u32>,
    /// The pod id `pod list` shows.
    #[arg(long)]
    pub id: Option<u32>,
    /// The name `pod list` shows.
    #[arg(long)]
    pub name: Option<String>,
}

/// Per-pod switches, with the syntax of Istio's `traffic.sidecar.istio.io/*` annotations.
#[derive(Debug, Args)]
pub struct PodEnableArgs {
    #[command(flatten)]
    pub target: PodTarget,
    #[command(flatten)]
    pub switches: Switches,
    /// How to intercept: ebpf (the in-kernel datapath), iptables (istio-iptables' rules in the
    /// pod's namespace), or auto (ebpf when this kernel can do all the pod asks, else iptables).
    #[arg(long, value_enum, default_value_t = Mode::Ebpf)]
    pub mode: Mode,
    /// iptables backend for --mode iptables: auto, nft or legacy.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    #[arg(long)]
    pub json: bool,
}

/// Istio's per-pod interception switches, shared by `pod enable` and `iptables apply`.
#[derive(Debug, Args)]
pub struct Switches {
    /// Inbound ports to capture: "*" (default) or a list; "" turns inbound capture off.
    #[arg(long, alias = "inbound-ports", default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured (15090, 15021, 15020 always are).
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound ports captured whatever the destination range.
    #[arg(long, default_value = "")]
    pub include_outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Destination ranges to capture: "*" (default) or CIDRs.
    #[arg(long, alias = "include-outbound-ip-ranges", default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Destination ranges never captured.
    #[arg(long, alias = "exclude-outbound-ip-ranges", default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// Do not capture outbound connections at all.
    #[arg(long)]
    pub no_outbound: bool,
    /// Keep this pod's app↔proxy hop on loopback TCP instead of sk_msg (for apps that block in
    /// read() while another thread writes to or half-closes the same socket; see README).
    #[arg(long)]
    pub no_sockmap: bool,
    /// Let a connect the datapath cannot send through the proxy go direct instead of refusing
    /// it (the default refuses: nothing bypasses the sidecar silently; see the
    /// `connect_refused_source` counter in `interceptor status`).
    #[arg(long)]
    pub fail_open: bool,
    /// UID of the pod's proxy (its connections are never captured). Never 0.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID of the pod's proxy (its connections are never captured). Never 0: a proxy running
    /// as root (Istio's TPROXY mode) is exempted by this group alone.
    #[arg(long, default_value_t = 1337)]
    pub proxy_gid: u32,
    /// Capture the pod's DNS (UDP and TCP port 53 to its resolv.conf nameservers) to the
    /// proxy's 15053, as Istio's ISTIO_META_DNS_CAPTURE.
    #[arg(long)]
    pub dns_capture: bool,
    /// With --dns-capture: every port-53 destination, not only the nameservers.
    #[arg(long, requires = "dns_capture")]
    pub dns_capture_all: bool,
    /// With --dns-capture: the nameservers to capture (default: the pod's resolv.conf).
    #[arg(long, value_delimiter = ',', requires = "dns_capture")]
    pub dns_servers: Vec<std::net::IpAddr>,
}

impl Switches {
    pub fn spec(&self) -> Result<PodSpec, SpecError> {
        spec::check_proxy_identity(self.proxy_uid, self.proxy_gid)?;
        let mut spec = PodSpec {
            outbound: !self.no_outbound,
            sockmap: !self.no_sockmap,
            fail_open: self.fail_open,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            dns: spec::DnsCapture {
                enabled: self.dns_capture,
                capture_all: self.dns_capture_all,
                nameservers: self.dns_servers.clone(),
            },
            ..PodSpec::default()
        };
        for (switch, flag, value) in [
            (
                Switch::IncludeInboundPorts,
                "--include-inbound-ports",
                &self.include_inbound_ports,
            ),
            (
                Switch::ExcludeInboundPorts,
                "--exclude-inbound-ports",
                &self.exclude_inbound_ports,
            ),
            (
                Switch::IncludeOutboundPorts,
                "--include-outbound-ports",
                &self.include_outbound_ports,
            ),
            (
                Switch::ExcludeOutboundPorts,
                "--exclude-outbound-ports",
                &self.exclude_outbound_ports,
            ),
            (
                Switch::IncludeOutboundCidrs,
                "--include-outbound-cidrs",
                &self.include_outbound_cidrs,
            ),
            (
                Switch::ExcludeOutboundCidrs,
                "--exclude-outbound-cidrs",
                &self.exclude_outbound_cidrs,
            ),
        ] {
            spec.set(switch, flag, value)?;
        }
        Ok(spec)
    }
}

#[derive(Debug, Subcommand)]
pub enum IptablesCommand {
    /// Write istio-iptables' chains into a network namespace (what Istio's init container does).
    Apply(IptablesApplyArgs),
    /// Remove exactly those chains (and the jumps into them) again.
    Remove(IptablesRemoveArgs),
}

#[derive(Debug, Args)]
pub struct IptablesApplyArgs {
    #[command(flatten)]
    pub target: NetnsTarget,
    #[command(flatten)]
    pub switches: Switches,
    /// The proxy's outbound capture port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The proxy's inbound capture port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// iptables backend: auto (the one the namespace already uses, else the system's), nft or
    /// legacy.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Print the rules (iptables-save format) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct IptablesRemoveArgs {
    #[command(flatten)]
    pub target: NetnsTarget,
    /// iptables backend: auto (the one holding the chains), nft or legacy.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    #[arg(long)]
    pub json: bool,
}

/// A network namespace named by `ip netns` name or by a process in it; optional for
/// `--dry-run`, which touches no namespace.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct NetnsTarget {
    /// A network namespace made with `ip netns add`.
    #[arg(long)]
    pub netns: Option<String>,
    /// A process inside the namespace.
    #[arg(long)]
    pub pid: Option<u32>,
}

/// Seconds from the command line as a Duration: negative and NaN are 0, anything past a year
/// is a year (`from_secs_f64` would panic on `inf`, and deadlines far past that overflow).
pub fn secs(v: f64) -> Duration {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    if v.is_nan() {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(v.clamp(0.0, YEAR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_never_panic() {
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::NAN), Duration::ZERO);
        assert_eq!(secs(1.5), Duration::from_millis(1500));
        assert_eq!(secs(f64::INFINITY), Duration::from_secs(365 * 24 * 3600));
        assert_eq!(secs(1e300), Duration::from_secs(365 * 24 * 3600));
    }
}
