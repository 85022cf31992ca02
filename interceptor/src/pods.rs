//! The registry of enabled pods: enable, disable, list, collect the dead. All state lives in the
//! pinned maps (so any process sees it and an agent restart loses nothing); a lock file
//! serialises writers (agents and `interceptor pod` commands).

mod iptables_mode;
pub mod spec;

use std::{
    fs::{self, File, OpenOptions},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
};

use interceptor_common::{
    addr::{Addr, v4_mapped},
    names::size,
    pod::{
        BACKEND_LEGACY, BACKEND_NFT, CIDR_V4, CIDR_V6, DIR_INBOUND, DIR_OUTBOUND, MODE_EBPF,
        MODE_IPTABLES, POD_FAIL_OPEN, POD_INBOUND, POD_INBOUND_ALL_PORTS, POD_NAME_LEN,
        POD_NO_SOCKMAP, POD_OUTBOUND, POD_OUTBOUND_ALL_CIDRS, PORT_EXCLUDE, PORT_INCLUDE,
        PodConfig, PodInfo, PortKey, SOURCE_KUBERNETES, SOURCE_NETNS, SOURCE_PID,
    },
};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use self::iptables_mode::Mode;
use self::spec::{Cidr, PodSpec, Selection};
use crate::{
    bpf::{self, Maps, Pins, maps::cidr_key},
    iptables::{self, Backend},
    listeners,
    netns::{self, Netns},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bpf(#[from] bpf::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(
        "cannot read the network-namespace cookie of {path}: {reason}. On kernels without \
         SO_NETNS_COOKIE (< 5.14) the running agent's connect4 program answers instead: start \
         `interceptor agent` first"
    )]
    NoCookie { path: PathBuf, reason: String },
    #[error("address {addr} already belongs to enabled pod {other}; disable it first")]
    AddressInUse { addr: IpAddr, other: String },
    #[error(
        "refusing to intercept {0}: it is the node's own network namespace, so every host \
         connection would go to a proxy. Name a pod's namespace (--netns) or a process inside a \
         pod (--pid)"
    )]
    NodeNetns(PathBuf),
    #[error("no enabled pod matches {0}; see `interceptor pod list`")]
    NotEnabled(String),
    #[error(
        "inbound capture needs sk_lookup (Linux >= 5.9), which this kernel lacks: enable the pod \
         with --include-inbound-ports \"\" (outbound only), or use --mode iptables"
    )]
    InboundUnavailable,
    #[error(
        "the pod asks for {count} {what}, more than the {limit} one pod may use of the \
         node-wide map {map} (so that no pod can leave others without room); shorten the list, \
         e.g. merge ranges into wider CIDRs"
    )]
    Quota {
        map: &'static str,
        what: &'static str,
        count: usize,
        limit: u32,
    },
    #[error(
        "DNS capture is not in the eBPF datapath yet: enable the pod with --mode iptables (or \
         auto, which picks iptables for it), or without --dns-capture"
    )]
    DnsCaptureNeedsIptables,
    #[error("the pod table is full ({0} pods); disable pods that are gone")]
    Full(u32),
    #[error("pod name {0:?} is longer than {POD_NAME_LEN} bytes")]
    NameTooLong(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables mode for pod {pod}: {source}")]
    Iptables {
        pod: String,
        #[source]
        source: iptables::Error,
    },
    #[error("the state of iptables-mode pod {pod} ({path}) is unreadable: {reason}")]
    Record {
        pod: String,
        path: PathBuf,
        reason: String,
    },
    #[error("writing map {map} for pod {pod}: {source} (map full?)")]
    MapWrite {
        map: &'static str,
        pod: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How a pod was named when it was enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSource {
    /// `ip netns add NAME`.
    Netns(String),
    /// A process in the pod.
    Pid(u32),
    /// A Kubernetes pod (`namespace/name`), found through one of its processes.
    Kubernetes { name: String, pid: u32 },
}

/// Which pod a `disable` means.
#[derive(Clone, Debug)]
pub enum PodRef {
    Netns(String),
    Pid(u32),
    Id(u32),
    Name(String),
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodRef::Netns(n) => write!(f, "netns {n}"),
            PodRef::Pid(p) => write!(f, "pid {p}"),
            PodRef::Id(i) => write!(f, "pod id {i}"),
            PodRef::Name(n) => write!(f, "pod {n}"),
        }
    }
}

/// One enabled pod, as `pod list` and `status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct PodEntry {
    pub id: u32,
    pub name: String,
    pub source: &'static str,
    /// `ebpf` or `iptables`.
    pub mode: &'static str,
    /// The iptables backend of an iptables-mode pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    pub netns_cookie: u64,
    pub addresses: Vec<IpAddr>,
    pub outbound: bool,
    pub inbound: bool,
    /// Socket cookie of the proxy's inbound listener, once resolved.
    pub inbound_listener: Option<u64>,
    /// Whether inbound connections can be handed to the proxy right now.
    pub inbound_ready: bool,
    pub spec: PodSpec,
}

/// Exclusive access to the pod tables.
pub struct Registry<'a> {
    pins: &'a Pins,
    maps: &'a mut Maps,
    _lock: Flock<File>,
}

impl<'a> Registry<'a> {
    /// Takes the writers' lock (waits for other writers).
    pub fn lock(pins: &'a Pins, maps: &'a mut Maps) -> Result<Self, Error> {
        let dir = pins.run_dir();
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("pods.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::Io {
                what: "opening",
                path: path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io {
            what: "locking",
            path,
            source: e.into(),
        })?;
        Ok(Self {
            pins,
            maps,
            _lock: lock,
        })
    }

    /// Starts (or updates) interception of the pod whose network namespace is `netns`.
    pub fn enable(
        &mut self,
        netns: &Netns,
        source: &PodSource,
        spec: &PodSpec,
    ) -> Result<PodEntry, Error> {
        let name = display_name(source);
        if name.len() > POD_NAME_LEN {
            return Err(Error::NameTooLong(name));
        }
        if netns.is_node() {
            return Err(Error::NodeNetns(netns.path().to_owned()));
        }
        if let Err(err) = check_quota(spec) {
            self.maps
                .bump(interceptor_common::counters::Counter::PodQuotaExceeded);
            return Err(err);
        }
        let inbound = spec.inbound();
        if inbound && !bpf::attach::sk_lookup_available(self.pins) {
            return Err(Error::InboundUnavailable);
        }
        let (cookie, addresses) = self.inspect(netns)?;
        let cfg = self.maps.global_config()?;
        ensure_passthrough_v6(netns, ip_of(cfg.passthrough_ip6), &addresses);
        let existing = self.find_by_netns(netns)?;
        // An update of a running pod must leave it as it was if it cannot be applied whole.
        let previous = match &existing {
            Some((id, info)) if info.mode == MODE_EBPF => Some(self.snapshot(*id, info)),
            _ => None,
        };
        let id = match existing {
            Some((id, info)) if info.mode == MODE_IPTABLES => {
                // Switching modes: the pod's iptables rules go before the datapath takes over.
                self.disable_iptables(id, &info, Some(netns))?;
                id
            }
            Some((id, _)) => id,
            None => self.free_id()?,
        };
        self.claim_addresses(cookie, &addresses)?;

        let proxy_ports = [cfg.outbound_port as u16, cfg.inbound_port as u16];
        let config = pod_config(id, spec, &addresses);
        let info = pod_info(cookie, netns, source, &name, MODE_EBPF, 0);
        if let Err(err) = self.write(id, cookie, &config, &info, spec, &addresses, &proxy_ports) {
            // Never leave a pod half-configured: a new pod goes, an updated one is restored.
            match previous {
                Some(previous) => {
                    warn!(pod = %name, %err, "updating failed; restoring the previous settings");
                    self.restore(id, &previous);
                }
                None => {
                    warn!(pod = %name, %err, "enabling failed; removing what was written");
                    let _ = self.remove(id, cookie);
                }
            }
            return Err(err);
        }
        if inbound {
            let already = self.pins.pod_sk_lookup(id).exists();
            if !already && let Err(err) = bpf::attach::attach_sk_lookup(self.pins, id, netns.file())
            {
                let _ = self.remove(id, cookie);
                return Err(err.into());
            }
            if let Err(err) = listeners::resolve(self.maps, id, netns, cfg.inbound_port as u16) {
                debug!(pod = %name, %err, "inbound listener not resolved yet");
            }
        } else {
            bpf::attach::detach_pod(self.pins, id)?;
        }
        info!(pod = %name, id, ?addresses, inbound, outbound = spec.outbound, "pod enabled");
        self.entry(id)
    }

    /// Stops interception of a pod and removes everything it had in the maps.
    pub fn disable(&mut self, pod: &PodRef) -> Result<PodEntry, Error> {
        let (id, info) = self
            .find(pod)?
            .ok_or_else(|| Error::NotEnabled(pod.to_string()))?;
        let entry = self.entry(id)?;
        if info.mode == MODE_IPTABLES {
            let netns = locate(&info).and_then(|p| Netns::open(p).ok());
            self.disable_iptables(id, &info, netns.as_ref())?;
        } else {
            self.remove(id, info.netns_cookie)?;
        }
        info!(pod = %entry.name, id, "pod disabled");
        Ok(entry)
    }

    /// Disables every pod whose network namespace no longer exists. Returns what was removed.
    pub fn collect_gone(&mut self) -> Result<Vec<PodEntry>, Error> {
        let mut gone = Vec::new();
        for (id, info) in self.infos() {
            if locate(&info).is_none() {
                let entry = self.entry(id)?;
                self.remove(id, info.netns_cookie)?;
                info!(pod = %entry.name, id, "pod's network namespace is gone; disabled");
                gone.push(entry);
            }
        }
        Ok(gone)
    }

    /// Matches inbound pods to their proxy's listener (see `listeners`). With `all` false,
    /// only pods whose listener is unknown or gone are looked at: a recorded listener that is
    /// still in `LISTENERS` is alive (the sockhash drops a socket when it closes), so a
    /// periodic pass does not enter every pod's namespace. A new listener (`all` true, on the
    /// datapath's listen event) re-checks every pod.
    pub fn resolve_listeners(&mut self, all: bool) -> Result<(), Error> {
        let cfg = self.maps.global_config()?;
        let live = self.maps.listener_cookies();
        for (id, info) in self.infos() {
            let inbound = self
                .maps
                .pod_config
                .get(&info.netns_cookie, 0)
                .is_ok_and(|c| c.flags & POD_INBOUND != 0);
            if !inbound {
                continue;
            }
            let alive = self
                .maps
                .pod_listener
                .get(&id, 0)
                .is_ok_and(|cookie| live.contains(&cookie))
                && self
                    .maps
                    .pod_listener6
                    .get(&id, 0)
                    .map_or(true, |cookie| live.contains(&cookie));
            if alive && !all {
                continue;
            }
            let Some(path) = locate(&info) else { continue };
            let Ok(netns) = Netns::open(&path) else {
                continue;
            };
            if let Err(err) = listeners::resolve(self.maps, id, &netns, cfg.inbound_port as u16) {
                debug!(pod = %pod_name(&info), %err, "inbound listener not resolved");
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<PodEntry>, Error> {
        list(self.pins, self.maps)
    }

    fn entry(&self, id: u32) -> Result<PodEntry, Error> {
        entry(self.pins, self.maps, id)
    }

    /// Every enabled pod's id and identity record (cheap: one map walk, no rules read).
    pub fn infos(&self) -> Vec<(u32, PodInfo)> {
        self.maps.pod_info.iter().filter_map(Result::ok).collect()
    }

    /// The namespace's cookie and addresses, read from inside it.
    fn inspect(&mut self, netns: &Netns) -> Result<(u64, Vec<IpAddr>), Error> {
        let (cookie, probe, addresses) = netns.run(|| {
            let cookie = netns::current_cookie();
            // Without SO_NETNS_COOKIE, ask connect4 (it records the cookie of a probe socket).
            let probe = match &cookie {
                Ok(Some(_)) => None,
                _ => Some(netns::probe_socket_cookie()),
            };
            (cookie, probe, netns::pod_addresses())
        })?;
        let cookie = match (cookie, probe) {
            (Ok(Some(cookie)), _) => cookie,
            (first, Some(Ok(sock_cookie))) => {
                let found = self.maps.netns_probe.get(&sock_cookie, 0).ok();
                let _ = self.maps.netns_probe.remove(&sock_cookie);
                found.ok_or_else(|| Error::NoCookie {
                    path: netns.path().to_owned(),
                    reason: match first {
                        Err(e) => e.to_string(),
                        Ok(_) => "the connect4 probe recorded nothing".into(),
                    },
                })?
            }
            (first, probe) => {
                return Err(Error::NoCookie {
                    path: netns.path().to_owned(),
                    reason: format!(
                        "SO_NETNS_COOKIE: {}; probe: {}",
                        first.map_or_else(|e| e.to_string(), |_| "unsupported".into()),
                        probe.map_or_else(
                            || "-".into(),
                            |r| r.err().map_or_else(String::new, |e| e.to_string())
                        )
                    ),
                });
            }
        };
        let addresses = addresses.map_err(|source| Error::Io {
            what: "listing addresses in",
            path: netns.path().to_owned(),
            source,
        })?;
        if addresses.is_empty() {
            warn!(netns = %netns.path().display(), "the pod has no address yet: inbound capture \
                  and source binding need one; enable it again once it has");
        }
        Ok((cookie, addresses))
    }

    fn find_by_netns(&self, netns: &Netns) -> Result<Option<(u32, PodInfo)>, Error> {
        Ok(self
            .infos()
            .into_iter()
            .find(|(_, i)| netns.same_as(i.netns_dev, i.netns_ino)))
    }

    fn find(&self, pod: &PodRef) -> Result<Option<(u32, PodInfo)>, Error> {
        match pod {
            PodRef::Id(id) => Ok(self.maps.pod_info.get(id, 0).ok().map(|i| (*id, i))),
            PodRef::Name(name) => Ok(self.infos().into_iter().find(|(_, i)| &pod_name(i) == name)),
            PodRef::Netns(name) => match Netns::by_name(name) {
                Ok(ns) => self.find_by_netns(&ns),
                // The namespace is gone: find the pod by the name it was enabled with.
                Err(_) => Ok(self
                    .infos()
                    .into_iter()
                    .find(|(_, i)| i.source == SOURCE_NETNS && pod_name(i) == *name)),
            },
            PodRef::Pid(pid) => match Netns::by_pid(*pid) {
                Ok(ns) => self.find_by_netns(&ns),
                Err(_) => Ok(self
                    .infos()
                    .into_iter()
                    .find(|(_, i)| i.source == SOURCE_PID && i.pid == *pid)),
            },
        }
    }

    fn free_id(&self) -> Result<u32, Error> {
        let used: std::collections::BTreeSet<u32> =
            self.maps.pod_info.keys().filter_map(Result::ok).collect();
        (1..=size::PODS)
            .find(|id| !used.contains(id))
            .ok_or(Error::Full(size::PODS))
    }

    /// Fails if another live pod owns one of these addresses; takes them over from dead pods
    /// (IP reuse after a pod went away without being disabled).
    fn claim_addresses(&mut self, cookie: u64, addresses: &[IpAddr]) -> Result<(), Error> {
        for ip in addresses {
            let Ok(owner) = self.maps.pod_ips.get(&addr(*ip), 0) else {
                continue;
            };
            if owner == cookie {
                continue;
            }
            let other = self
                .infos()
                .into_iter()
                .find(|(_, i)| i.netns_cookie == owner);
            match other {
                Some((id, info)) if locate(&info).is_none() => {
                    info!(pod = %pod_name(&info), %ip, "address reused: removing the gone pod");
                    self.remove(id, owner)?;
                }
                Some((_, info)) => {
                    return Err(Error::AddressInUse {
                        addr: *ip,
                        other: pod_name(&info),
                    });
                }
                None => {
                    let _ = self.maps.pod_ips.remove(&addr(*ip));
                }
            }
        }
        Ok(())
    }

    /// Writes a pod's entries: rules first, then addresses, then the config that switches it on,
    /// then stale rules of a previous spec are dropped.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        id: u32,
        cookie: u64,
        config: &PodConfig,
        info: &PodInfo,
        spec: &PodSpec,
        addresses: &[IpAddr],
        proxy_ports: &[u16],
    ) -> Result<(), Error> {
        let name = pod_name(info);
        let map_err = |map: &'static str| {
            let name = name.clone();
            move |source| Error::MapWrite {
                map,
                pod: name,
                source,
            }
        };
        let mut ports = Vec::new();
        for port in spec.effective_inbound_exclusions(proxy_ports) {
            ports.push((port_key(id, port, DIR_INBOUND), PORT_EXCLUDE));
        }
        if let Selection::List(list) = &spec.include_inbound_ports {
            for &port in list {
                if !spec
                    .effective_inbound_exclusions(proxy_ports)
                    .contains(&port)
                {
                    ports.push((port_key(id, port, DIR_INBOUND), PORT_INCLUDE));
                }
            }
        }
        for &port in &spec.exclude_outbound_ports {
            ports.push((port_key(id, port, DIR_OUTBOUND), PORT_EXCLUDE));
        }
        for &port in &spec.include_outbound_ports {
            if !spec.exclude_outbound_ports.contains(&port) {
                ports.push((port_key(id, port, DIR_OUTBOUND), PORT_INCLUDE));
            }
        }
        for (key, rule) in &ports {
            self.maps
                .pod_ports
                .insert(key, rule, 0)
                .map_err(map_err("POD_PORTS"))?;
        }
        let excluded: Vec<(u32, Addr, u32)> =
            spec.exclude_outbound_cidrs.iter().map(cidr_entry).collect();
        let included: Vec<(u32, Addr, u32)> = match &spec.include_outbound_cidrs {
            Selection::All => Vec::new(),
            Selection::List(list) => list.iter().map(cidr_entry).collect(),
        };
        for (family, ip, bits) in &excluded {
            self.maps
                .cidr_exclude
                .insert(&cidr_key(id, *family, *ip, *bits), 1, 0)
                .map_err(map_err("CIDR_EXCLUDE"))?;
        }
        for (family, ip, bits) in &included {
            self.maps
                .cidr_include
                .insert(&cidr_key(id, *family, *ip, *bits), 1, 0)
                .map_err(map_err("CIDR_INCLUDE"))?;
        }
        for ip in addresses {
            self.maps
                .pod_ips
                .insert(addr(*ip), cookie, 0)
                .map_err(map_err("POD_IPS"))?;
        }
        self.maps
            .pod_info
            .insert(id, *info, 0)
            .map_err(map_err("POD_INFO"))?;
        // The switch: from here on the pod's connects are intercepted.
        self.maps
            .pod_config
            .insert(cookie, *config, 0)
            .map_err(map_err("POD_CONFIG"))?;

        // Drop what an earlier spec of this pod had and this one does not.
        let keep: std::collections::HashSet<PortKey> = ports.iter().map(|(k, _)| *k).collect();
        let stale: Vec<PortKey> = self
            .maps
            .pod_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pod_id == id && !keep.contains(k))
            .collect();
        for key in stale {
            let _ = self.maps.pod_ports.remove(&key);
        }
        remove_stale_cidrs(&mut self.maps.cidr_exclude, id, &excluded);
        remove_stale_cidrs(&mut self.maps.cidr_include, id, &included);
        let stale_ips: Vec<Addr> = self
            .maps
            .pod_ips
            .iter()
            .filter_map(Result::ok)
            .filter(|(ip, c)| *c == cookie && !addresses.iter().any(|a| addr(*a) == *ip))
            .map(|(ip, _)| ip)
            .collect();
        for ip in stale_ips {
            let _ = self.maps.pod_ips.remove(&ip);
        }
        Ok(())
    }

    /// Every datapath entry of an enabled (eBPF) pod, to put back if an update fails.
    fn snapshot(&self, id: u32, info: &PodInfo) -> Entries {
        let cookie = info.netns_cookie;
        let mine = |k: &aya::maps::lpm_trie::Key<interceptor_common::pod::CidrKey>| {
            u32::from_be(k.data().pod_id_be) == id
        };
        Entries {
            info: *info,
            config: self.maps.pod_config.get(&cookie, 0).ok(),
            ips: self
                .maps
                .pod_ips
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, c)| *c == cookie)
                .collect(),
            ports: self
                .maps
                .pod_ports
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| k.pod_id == id)
                .collect(),
            excluded: self
                .maps
                .cidr_exclude
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| mine(k))
                .collect(),
            included: self
                .maps
                .cidr_include
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| mine(k))
                .collect(),
        }
    }

    /// Puts a pod's entries back as `snapshot` had them, dropping what a failed update added.
    /// Best effort: every entry restored fitted before, and the update's extra ones go first.
    fn restore(&mut self, id: u32, snapshot: &Entries) {
        let cookie = snapshot.info.netns_cookie;
        let ports: Vec<PortKey> = self
            .maps
            .pod_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pod_id == id && !snapshot.ports.iter().any(|(o, _)| o == k))
            .collect();
        for key in ports {
            let _ = self.maps.pod_ports.remove(&key);
        }
        let ips: Vec<Addr> = self
            .maps
            .pod_ips
            .iter()
            .filter_map(Result::ok)
            .filter(|(ip, c)| *c == cookie && !snapshot.ips.iter().any(|(o, _)| o == ip))
            .map(|(ip, _)| ip)
            .collect();
        for ip in ips {
            let _ = self.maps.pod_ips.remove(&ip);
        }
        let keep = |entries: &[(
            aya::maps::lpm_trie::Key<interceptor_common::pod::CidrKey>,
            u32,
        )]| {
            entries
                .iter()
                .map(|(k, _)| (k.data().family, k.data().ip, k.prefix_len() - 64))
                .collect::<Vec<_>>()
        };
        remove_stale_cidrs(&mut self.maps.cidr_exclude, id, &keep(&snapshot.excluded));
        remove_stale_cidrs(&mut self.maps.cidr_include, id, &keep(&snapshot.included));
        for (key, rule) in &snapshot.ports {
            let _ = self.maps.pod_ports.insert(key, rule, 0);
        }
        for (key, value) in &snapshot.excluded {
            let _ = self.maps.cidr_exclude.insert(key, value, 0);
        }
        for (key, value) in &snapshot.included {
            let _ = self.maps.cidr_include.insert(key, value, 0);
        }
        for (ip, c) in &snapshot.ips {
            let _ = self.maps.pod_ips.insert(ip, c, 0);
        }
        let _ = self.maps.pod_info.insert(id, snapshot.info, 0);
        match &snapshot.config {
            Some(config) => {
                let _ = self.maps.pod_config.insert(cookie, config, 0);
            }
            None => {
                let _ = self.maps.pod_config.remove(&cookie);
            }
        }
    }

    /// Removes every entry of a pod: the switch first, then its rules and its netns link.
    fn remove(&mut self, id: u32, cookie: u64) -> Result<(), Error> {
        let _ = self.maps.pod_config.remove(&cookie);
        let ips: Vec<Addr> = self
            .maps
            .pod_ips
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| *c == cookie)
            .map(|(ip, _)| ip)
            .collect();
        for ip in ips {
            let _ = self.maps.pod_ips.remove(&ip);
        }
        let ports: Vec<PortKey> = self
            .maps
            .pod_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pod_id == id)
            .collect();
        for key in ports {
            let _ = self.maps.pod_ports.remove(&key);
        }
        remove_stale_cidrs(&mut self.maps.cidr_exclude, id, &[]);
        remove_stale_cidrs(&mut self.maps.cidr_include, id, &[]);
        let _ = self.maps.pod_listener.remove(&id);
        let _ = self.maps.pod_listener6.remove(&id);
        bpf::attach::detach_pod(self.pins, id)?;
        iptables_mode::forget(self.pins, id);
        let _ = self.maps.pod_info.remove(&id);
        Ok(())
    }
}

/// A pod's datapath entries (see `Registry::snapshot`).
struct Entries {
    info: PodInfo,
    config: Option<PodConfig>,
    ips: Vec<(Addr, u64)>,
    ports: Vec<(PortKey, u32)>,
    excluded: Vec<(
        aya::maps::lpm_trie::Key<interceptor_common::pod::CidrKey>,
        u32,
    )>,
    included: Vec<(
        aya::maps::lpm_trie::Key<interceptor_common::pod::CidrKey>,
        u32,
    )>,
}

fn remove_stale_cidrs(
    trie: &mut aya::maps::LpmTrie<aya::maps::MapData, interceptor_common::pod::CidrKey, u32>,
    id: u32,
    keep: &[(u32, Addr, u32)],
) {
    // A set, so a pod with many ranges costs one pass over the trie, not keys × ranges.
    let keep: std::collections::HashSet<(u32, Addr, u32)> = keep
        .iter()
        .map(|&(family, ip, bits)| {
            (
                family,
                ip,
                interceptor_common::pod::CidrKey::prefix_len(bits),
            )
        })
        .collect();
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let data = k.data();
            u32::from_be(data.pod_id_be) == id
                && !keep.contains(&(data.family, data.ip, k.prefix_len()))
        })
        .collect();
    for key in stale {
        let _ = trie.remove(&key);
    }
}

/// Puts the IPv6 passthrough source (Istio: `::6`) on the pod's loopback when the pod has IPv6,
/// as istio-iptables does: the proxy's inbound hop to the app is bound to it. Without it IPv6
/// inbound connections fail at the proxy (it never falls back to a source that would be
/// captured again), so a failure is logged, not fatal.
fn ensure_passthrough_v6(netns: &Netns, passthrough: IpAddr, addresses: &[IpAddr]) {
    let IpAddr::V6(source) = passthrough else {
        return;
    };
    if !addresses.iter().any(IpAddr::is_ipv6) {
        return;
    }
    match netns.run(|| netns::ensure_loopback_v6(source)) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(
            netns = %netns.path().display(), %source, %err,
            "cannot add the IPv6 passthrough source to the pod's loopback: IPv6 inbound \
             connections will fail at its proxy"
        ),
        Err(err) => warn!(%err, "entering the pod to add the IPv6 passthrough source"),
    }
}

/// Every enabled pod.
pub fn list(pins: &Pins, maps: &Maps) -> Result<Vec<PodEntry>, Error> {
    let mut ids: Vec<u32> = maps.pod_info.keys().filter_map(Result::ok).collect();
    ids.sort_unstable();
    ids.into_iter().map(|id| entry(pins, maps, id)).collect()
}

fn source_name(info: &PodInfo) -> &'static str {
    match info.source {
        SOURCE_NETNS => "netns",
        SOURCE_PID => "pid",
        SOURCE_KUBERNETES => "kubernetes",
        _ => "unknown",
    }
}

fn entry(pins: &Pins, maps: &Maps, id: u32) -> Result<PodEntry, Error> {
    let info = maps
        .pod_info
        .get(&id, 0)
        .map_err(|_| Error::NotEnabled(format!("pod id {id}")))?;
    if info.mode == MODE_IPTABLES {
        return iptables_mode::entry(pins, id, &info);
    }
    let config = maps.pod_config.get(&info.netns_cookie, 0).ok();
    let mut addresses: Vec<IpAddr> = maps
        .pod_ips
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, c)| *c == info.netns_cookie)
        .map(|(a, _)| ip_of(a))
        .collect();
    addresses.sort();
    let listener = maps.pod_listener.get(&id, 0).ok();
    let inbound = config.is_some_and(|c| c.flags & POD_INBOUND != 0);
    Ok(PodEntry {
        id,
        name: pod_name(&info),
        source: source_name(&info),
        mode: "ebpf",
        backend: None,
        netns_cookie: info.netns_cookie,
        addresses,
        outbound: config.is_some_and(|c| c.flags & POD_OUTBOUND != 0),
        inbound,
        inbound_listener: listener,
        inbound_ready: inbound && listener.is_some_and(|c| maps.has_listener(c)),
        spec: read_spec(maps, id, config.as_ref()),
    })
}

/// The spec as the maps hold it (what the datapath really does).
fn read_spec(maps: &Maps, id: u32, config: Option<&PodConfig>) -> PodSpec {
    let flags = config.map_or(0, |c| c.flags);
    let mut spec = PodSpec {
        include_inbound_ports: if flags & POD_INBOUND_ALL_PORTS != 0 {
            Selection::All
        } else {
            Selection::List(Vec::new())
        },
        include_outbound_cidrs: if flags & POD_OUTBOUND_ALL_CIDRS != 0 {
            Selection::All
        } else {
            Selection::List(Vec::new())
        },
        outbound: flags & POD_OUTBOUND != 0,
        sockmap: flags & POD_NO_SOCKMAP == 0,
        fail_open: flags & POD_FAIL_OPEN != 0,
        proxy_uid: config.map_or(0, |c| c.proxy_uid),
        proxy_gid: config.map_or(0, |c| c.proxy_gid),
        ..PodSpec::default()
    };
    for (key, rule) in maps.pod_ports.iter().filter_map(Result::ok) {
        if key.pod_id != id {
            continue;
        }
        let list = match (key.direction, rule) {
            (DIR_INBOUND, PORT_EXCLUDE) => &mut spec.exclude_inbound_ports,
            (DIR_INBOUND, PORT_INCLUDE) => match &mut spec.include_inbound_ports {
                Selection::List(l) => l,
                Selection::All => continue,
            },
            (DIR_OUTBOUND, PORT_EXCLUDE) => &mut spec.exclude_outbound_ports,
            (DIR_OUTBOUND, PORT_INCLUDE) => &mut spec.include_outbound_ports,
            _ => continue,
        };
        list.push(key.port);
    }
    let cidrs = |trie: &aya::maps::LpmTrie<_, interceptor_common::pod::CidrKey, u32>| {
        let mut out: Vec<Cidr> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| u32::from_be(k.data().pod_id_be) == id)
            .map(|k| cidr_of(k.data().family, k.data().ip, k.prefix_len() - 64))
            .collect();
        out.sort_by_key(|c| (c.addr, c.prefix));
        out
    };
    spec.exclude_outbound_cidrs = cidrs(&maps.cidr_exclude);
    if let Selection::List(l) = &mut spec.include_outbound_cidrs {
        *l = cidrs(&maps.cidr_include);
    }
    for list in [
        &mut spec.exclude_inbound_ports,
        &mut spec.exclude_outbound_ports,
        &mut spec.include_outbound_ports,
    ] {
        list.sort_unstable();
    }
    if let Selection::List(l) = &mut spec.include_inbound_ports {
        l.sort_unstable();
    }
    spec
}

/// A path to the pod's network namespace if it still exists.
pub fn locate(info: &PodInfo) -> Option<PathBuf> {
    let same =
        |p: &PathBuf| Netns::open(p).is_ok_and(|ns| ns.same_as(info.netns_dev, info.netns_ino));
    let primary = match info.source {
        SOURCE_NETNS => Some(PathBuf::from(netns::NETNS_RUN_DIR).join(pod_name(info))),
        SOURCE_PID | SOURCE_KUBERNETES => Some(PathBuf::from(format!("/proc/{}/ns/net", info.pid))),
        _ => None,
    };
    primary
        .filter(same)
        .or_else(|| netns::find_by_identity(info.netns_dev, info.netns_ino))
}

fn display_name(source: &PodSource) -> String {
    match source {
        PodSource::Netns(n) => n.clone(),
        PodSource::Pid(p) => format!("pid:{p}"),
        PodSource::Kubernetes { name, .. } => name.clone(),
    }
}

pub fn pod_name(info: &PodInfo) -> String {
    let end = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    String::from_utf8_lossy(&info.name[..end]).into_owned()
}

fn pod_info(
    cookie: u64,
    netns: &Netns,
    source: &PodSource,
    name: &str,
    mode: u32,
    backend: u32,
) -> PodInfo {
    let mut bytes = [0u8; POD_NAME_LEN];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    let (kind, pid) = match source {
        PodSource::Netns(_) => (SOURCE_NETNS, 0),
        PodSource::Pid(p) => (SOURCE_PID, *p),
        PodSource::Kubernetes { pid, .. } => (SOURCE_KUBERNETES, *pid),
    };
    PodInfo {
        netns_cookie: cookie,
        netns_ino: netns.ino,
        netns_dev: netns.dev,
        source: kind,
        pid,
        mode,
        backend,
        name: bytes,
    }
}

fn backend_code(backend: Backend) -> u32 {
    match backend {
        Backend::Nft => BACKEND_NFT,
        Backend::Legacy => BACKEND_LEGACY,
    }
}

fn backend_of(code: u32) -> Backend {
    if code == BACKEND_LEGACY {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

fn pod_config(id: u32, spec: &PodSpec, addresses: &[IpAddr]) -> PodConfig {
    let mut flags = 0;
    if spec.outbound {
        flags |= POD_OUTBOUND;
    }
    if spec.inbound() {
        flags |= POD_INBOUND;
    }
    if spec.include_inbound_ports == Selection::All {
        flags |= POD_INBOUND_ALL_PORTS;
    }
    if spec.include_outbound_cidrs == Selection::All {
        flags |= POD_OUTBOUND_ALL_CIDRS;
    }
    if !spec.sockmap {
        flags |= POD_NO_SOCKMAP;
    }
    if spec.fail_open {
        flags |= POD_FAIL_OPEN;
    }
    let ip4 = addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(_) => None,
    });
    let ip6 = addresses.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(addr(IpAddr::V6(*v6))),
        IpAddr::V4(_) => None,
    });
    PodConfig {
        pod_id: id,
        flags,
        proxy_uid: spec.proxy_uid,
        proxy_gid: spec.proxy_gid,
        ip4: ip4.unwrap_or(0),
        ip6: ip6.unwrap_or([0; 4]),
    }
}

fn port_key(pod_id: u32, port: u16, direction: u16) -> PortKey {
    PortKey {
        pod_id,
        port,
        direction,
    }
}

/// A pod's share of the node-wide maps (see `names::size::PER_POD_*`).
fn check_quota(spec: &PodSpec) -> Result<(), Error> {
    let cidrs = |map, what, count: usize| {
        if count > size::PER_POD_CIDRS as usize {
            return Err(Error::Quota {
                map,
                what,
                count,
                limit: size::PER_POD_CIDRS,
            });
        }
        Ok(())
    };
    cidrs(
        "CIDR_EXCLUDE",
        "excluded outbound ranges",
        spec.exclude_outbound_cidrs.len(),
    )?;
    if let Selection::List(list) = &spec.include_outbound_cidrs {
        cidrs("CIDR_INCLUDE", "included outbound ranges", list.len())?;
    }
    let mut ports = spec.exclude_inbound_ports.len()
        + spec.include_outbound_ports.len()
        + spec.exclude_outbound_ports.len();
    if let Selection::List(list) = &spec.include_inbound_ports {
        ports += list.len();
    }
    // Room for the ports every pod excludes (proxy ports, 15090, 15021, 15020, 22).
    let limit = size::PER_POD_PORTS - 8;
    if ports > limit as usize {
        return Err(Error::Quota {
            map: "POD_PORTS",
            what: "port rules",
            count: ports,
            limit,
        });
    }
    Ok(())
}

fn cidr_entry(c: &Cidr) -> (u32, Addr, u32) {
    let family = match c.addr {
        IpAddr::V4(_) => CIDR_V4,
        IpAddr::V6(_) => CIDR_V6,
    };
    (family, addr(c.addr), c.mapped_bits())
}

/// An address as the maps store it: four network-order words, IPv4 mapped.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

/// The inverse of [`addr`].
pub fn ip_of(a: Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn cidr_of(family: u32, a: Addr, mapped_bits: u32) -> Cidr {
    match ip_of(a) {
        IpAddr::V4(v4) if family == CIDR_V4 => Cidr {
            addr: IpAddr::V4(v4),
            prefix: mapped_bits.saturating_sub(96) as u8,
        },
        // An IPv6 range inside ::ffff:0:0/96 stays an IPv6 range.
        IpAddr::V4(v4) => Cidr {
            addr: IpAddr::V6(v4.to_ipv6_mapped()),
            prefix: mapped_bits as u8,
        },
        ip => Cidr {
            addr: ip,
            prefix: mapped_bits as u8,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn address_round_trip() {
        for s in ["198.18.0.7", "fd00:198:18::7", "::1", "127.0.0.6"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_of(addr(ip)), ip);
        }
        // IPv4 is stored mapped: the kernel's v4_mapped gives the same words.
        let v4: Ipv4Addr = "198.18.0.7".parse().unwrap();
        assert_eq!(
            addr(IpAddr::V4(v4)),
            v4_mapped(u32::from_be_bytes(v4.octets()).to_be())
        );
    }

    #[test]
    fn config_flags_follow_spec() {
        let addrs: Vec<IpAddr> = vec![
            "198.18.0.7".parse().unwrap(),
            "fd00:198:18::7".parse().unwrap(),
        ];
        let c = pod_config(3, &PodSpec::default(), &addrs);
        assert_eq!(c.pod_id, 3);
        assert_eq!(
            c.flags,
            POD_OUTBOUND | POD_INBOUND | POD_INBOUND_ALL_PORTS | POD_OUTBOUND_ALL_CIDRS
        );
        assert_eq!(c.ip4, u32::from_ne_bytes([198, 18, 0, 7]));
        assert_eq!(ip_of(c.ip6), addrs[1]);
        let spec = PodSpec {
            include_inbound_ports: Selection::List(vec![]),
            include_outbound_cidrs: Selection::List(vec!["10.0.0.0/8".parse().unwrap()]),
            ..PodSpec::default()
        };
        assert_eq!(pod_config(1, &spec, &[]).flags, POD_OUTBOUND);
    }

    #[test]
    fn cidr_round_trip() {
        for c in [
            "10.1.0.0/16",
            "fd00::/8",
            "::/0",
            "::ffff:10.0.0.0/104",
            "0.0.0.0/0",
        ] {
            let c: Cidr = c.parse().unwrap();
            let (family, a, bits) = cidr_entry(&c);
            assert_eq!(cidr_of(family, a, bits), c);
        }
    }
}
