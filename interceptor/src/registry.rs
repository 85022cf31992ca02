//! The registry of enabled pods: enable, disable, list, collect the dead. All state lives in the
//! pinned maps (so any process sees it and an agent restart loses nothing); a lock file
//! serialises writers (agents and `interceptor pod` commands).

mod datapath;
mod iptables_mode;
mod mode;
mod rebuild;
pub mod spec;

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    net::IpAddr,
    path::PathBuf,
};

use interceptor_common::{
    addr,
    pod::{
        BACKEND_LEGACY, BACKEND_NFT, MODE_EBPF, MODE_IPTABLES, POD_INBOUND, POD_NAME_LEN,
        POD_OUTBOUND, PodConfig, PodInfo, SOURCE_KUBERNETES, SOURCE_NETNS, SOURCE_PID,
    },
};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::spec::PodSpec;
pub use self::{
    mode::Mode,
    rebuild::{Rebuilt, rebuild},
};
use crate::{
    bpf::{
        self, Maps, Pins,
        maps::{ListenerFamily, PodRows},
    },
    discovery::{
        held::HeldNamespaces,
        listeners,
        netns::{self, Netns, NetnsOwners},
    },
    iptables::{self, Backend},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bpf(#[from] bpf::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(
        "the datapath's maps were replaced (an agent upgrade or --replace) while this waited \
         for the pod registry, and they cannot be opened again: {0}"
    )]
    MapsReplaced(#[source] Box<bpf::Error>),
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
        "DNS capture in eBPF mode needs the cgroup sendmsg4/6 and recvmsg4/6 hooks (Linux >= \
         5.2), which this datapath could not attach: enable the pod with --mode iptables (or \
         auto, which falls back to iptables for it), or without --dns-capture"
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
    #[error(
        "the proxy listener of inbound pod {pod} cannot be registered in the new maps: {source}"
    )]
    Listener {
        pod: String,
        #[source]
        source: Box<listeners::Error>,
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

impl Drop for Registry<'_> {
    fn drop(&mut self) {
        // Before the lock goes: what the session read is only true while it is held.
        self.maps.end_session();
    }
}

/// Which inbound pods a listener pass looks into.
#[derive(Clone, Copy)]
enum Which {
    /// Pods with no listener recorded.
    Unrecorded,
    /// Pods with no listener recorded or whose recorded listener closed.
    NotAlive,
    /// Every inbound pod.
    All,
}

/// Exclusive access to the pod tables.
pub struct Registry<'a> {
    pins: &'a Pins,
    maps: &'a mut Maps,
    _lock: Flock<File>,
    /// Cancelled when the agent stops: a pass over every pod ends between two pods.
    stop: Option<CancellationToken>,
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
        let lock = loop {
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
                path: path.clone(),
                source: e.into(),
            })?;
            // An uninstall or `--replace` removes the lock file while others wait on it: the
            // next writer locks a new file, so this one must too, or two write at once.
            if same_file(&lock, &path) {
                break lock;
            }
            fs::create_dir_all(&dir).map_err(|source| Error::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        };
        // Opened before an upgrade or a `--replace` that happened while this waited: the maps
        // in the pins' place now are others. Reopened (refused if their ABI is not ours).
        if !maps.is_current(pins) {
            *maps = Maps::open(pins).map_err(|e| Error::MapsReplaced(Box::new(e)))?;
            info!("the pinned maps were replaced while waiting for the registry lock; reopened");
        }
        maps.begin_session();
        Ok(Self {
            pins,
            maps,
            _lock: lock,
            stop: None,
        })
    }

    /// Passes over every pod (`collect_gone_held`, listener resolution) end early, between two
    /// pods, once `stop` is cancelled: what they leave is the next pass's (or the next
    /// agent's) to do. An agent asked to stop in the middle of a pass over 10 000 pods
    /// otherwise finished the pass first.
    pub fn until(mut self, stop: &CancellationToken) -> Self {
        self.stop = Some(stop.clone());
        self
    }

    /// Whether the holder was asked to stop (see [`Registry::until`]).
    pub fn stopping(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
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
        if let Err(err) = datapath::check_quota(spec) {
            self.maps
                .bump(interceptor_common::counters::Counter::PodQuotaExceeded);
            return Err(err);
        }
        let inbound = spec.inbound();
        if inbound && !bpf::attach::sk_lookup_available(self.pins) {
            return Err(Error::InboundUnavailable);
        }
        if spec.dns.enabled && !bpf::attach::dns_capture_available(self.pins) {
            return Err(Error::DnsCaptureNeedsIptables);
        }
        let (cookie, addresses) = self.inspect(netns)?;
        let cfg = self.maps.global_config()?;
        ensure_passthrough_v6(netns, addr::to_ip(cfg.passthrough_ip6), &addresses);
        let existing = self.find_by_netns(netns)?;
        // An update of a running pod must leave it as it was if it cannot be applied whole.
        let previous = match &existing {
            Some((id, info)) if info.mode == MODE_EBPF => Some((
                *info,
                self.maps.pod_config(info.netns_cookie),
                self.maps.pod_rows(*id, info.netns_cookie),
            )),
            _ => None,
        };
        let fresh = existing.is_none();
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
        let config = datapath::pod_config(id, spec, &addresses);
        let rows = datapath::pod_rows(spec, &addresses, &proxy_ports);
        let info = pod_info(cookie, netns, source, &name, MODE_EBPF, 0);
        // A free id has no rows to replace (see `Maps::insert_pod`).
        let written = if fresh {
            self.maps.insert_pod(id, &info, &config, &rows)
        } else {
            self.maps.write_pod(id, &info, &config, &rows)
        };
        if let Err(source) = written {
            let err = Error::MapWrite {
                map: source.map,
                pod: name.clone(),
                source: source.source,
            };
            // Never leave a pod half-configured: a new pod goes, an updated one is restored.
            match previous {
                Some((info, config, rows)) => {
                    warn!(pod = %name, %err, "updating failed; restoring the previous settings");
                    self.maps.restore_pod(id, &info, config.as_ref(), &rows);
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
                // Refused by the kernel is not "not yet": retrying will not help.
                if crate::capabilities::is_denied(&err) {
                    warn!(pod = %name, %err, "inbound listener cannot be resolved");
                } else {
                    debug!(pod = %name, %err, "inbound listener not resolved yet");
                }
            }
        } else {
            bpf::attach::detach_pod(self.pins, id)?;
        }
        info!(pod = %name, id, ?addresses, inbound, outbound = spec.outbound, "pod enabled");
        // What was just written is the pod's rows (write_pod drops the rest): no read of every
        // pod's rows to say so.
        Ok(ebpf_entry(
            id,
            &info,
            Some(config),
            rows.as_stored(),
            self.maps.pod_listener(id, ListenerFamily::V4),
            |cookie| self.maps.has_listener(cookie),
        ))
    }

    /// Deletes rows left under ids no pod holds by a writer that died part-way, in an older
    /// build's order (rows before the identity record). The agent does it once at start; see
    /// `Maps::insert_pod`.
    pub fn drop_orphan_rows(&mut self) {
        let n = self.maps.drop_orphan_rows();
        if n > 0 {
            info!(ids = n, "removed rows left under ids no pod holds");
        }
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
        self.collect_gone_held(&mut HeldNamespaces::default())
    }

    /// As `collect_gone`, for a caller that keeps pods' namespaces open between passes (the
    /// agent): a held namespace is found again by a `stat`, without entering it.
    pub fn collect_gone_held(&mut self, held: &mut HeldNamespaces) -> Result<Vec<PodEntry>, Error> {
        let mut gone = Vec::new();
        let infos = self.infos();
        let ids: std::collections::HashSet<u32> = infos.iter().map(|(id, _)| *id).collect();
        held.retain(|id| ids.contains(&id));
        // One walk of /proc for every pod whose name no longer resolves, not one each.
        let mut owners = NetnsOwners::default();
        for (id, info) in infos {
            if self.stopping() {
                debug!(
                    removed = gone.len(),
                    "stopping: the rest of the pass is left undone"
                );
                break;
            }
            if held
                .locate(id, &info, primary_path(&info), &mut owners, |owners| {
                    locate_with(&info, owners)
                })
                .is_none()
            {
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
    /// periodic pass does not enter every pod's namespace. With `all` true every inbound pod is
    /// looked into (listen events go through `resolve_new_listeners`, cheapest first).
    pub fn resolve_listeners(&mut self, all: bool) -> Result<(), Error> {
        self.resolve(if all { Which::All } else { Which::NotAlive })
            .map(drop)
    }

    /// Returns the cookies of every listener found in the pods it looked into.
    fn resolve(&mut self, which: Which) -> Result<HashSet<u64>, Error> {
        let cfg = self.maps.global_config()?;
        let mut seen = HashSet::new();
        // Walking the listener sockhash is one syscall per listener: only when asked.
        let live = match which {
            Which::NotAlive => self.maps.listener_cookies(),
            Which::Unrecorded | Which::All => Default::default(),
        };
        // Read whole (batched): per-pod lookups made each pass cost O(pods) syscalls.
        let configs = self.maps.pod_configs();
        let (v4, v6) = (
            self.maps.pod_listeners(ListenerFamily::V4),
            self.maps.pod_listeners(ListenerFamily::V6),
        );
        for (id, info) in self.infos() {
            if self.stopping() {
                break;
            }
            let inbound = configs
                .get(&info.netns_cookie)
                .is_some_and(|c| c.flags & POD_INBOUND != 0);
            if !inbound {
                continue;
            }
            let skip = match which {
                Which::Unrecorded => v4.contains_key(&id) || v6.contains_key(&id),
                Which::NotAlive => {
                    v4.get(&id).is_some_and(|cookie| live.contains(cookie))
                        && v6.get(&id).is_none_or(|cookie| live.contains(cookie))
                }
                Which::All => false,
            };
            if skip {
                continue;
            }
            let Some(path) = locate(&info) else { continue };
            let Ok(netns) = Netns::open(&path) else {
                continue;
            };
            match listeners::resolve(self.maps, id, &netns, cfg.inbound_port as u16) {
                Ok(found) => seen.extend(found),
                Err(err) if crate::capabilities::is_denied(&err) => {
                    warn!(pod = %pod_name(&info), %err, "inbound listener cannot be resolved");
                }
                Err(err) => {
                    debug!(pod = %pod_name(&info), %err, "inbound listener not resolved");
                }
            }
        }
        Ok(seen)
    }

    /// Matches newly announced listeners (socket cookies from the datapath's listen events)
    /// to their pods. The pods without a live listener are looked at first, one namespace each;
    /// only a listener none of them took (a second listener in a pod that has one, as a proxy
    /// restarting with SO_REUSEPORT opens) costs a look into every pod. With thousands of pods
    /// starting their proxies, re-checking every pod per event made each start cost O(pods)
    /// namespace entries (node-scale benchmark: 180 ms per `pod enable` at 250 pods).
    pub fn resolve_new_listeners(&mut self, cookies: &[u64]) -> Result<(), Error> {
        // Cheapest first: pods with no listener recorded (a proxy starting), then pods whose
        // recorded listener closed (a proxy restarting), then every pod.
        // A listener counts as placed once its pod was looked into: a proxy's further
        // SO_REUSEPORT sockets (Envoy: one per worker) are seen there but not recorded.
        let mut seen: HashSet<u64> = [ListenerFamily::V4, ListenerFamily::V6]
            .into_iter()
            .flat_map(|f| self.maps.pod_listeners(f).into_values())
            .collect();
        for which in [Which::Unrecorded, Which::NotAlive, Which::All] {
            if cookies.iter().all(|c| seen.contains(c)) {
                break;
            }
            seen.extend(self.resolve(which)?);
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<PodEntry>, Error> {
        list(self.pins, self.maps)
    }

    fn entry(&self, id: u32) -> Result<PodEntry, Error> {
        entry(self.pins, self.maps, id)
    }

    /// One pod's identity record (one lookup).
    pub fn info(&self, id: u32) -> Option<PodInfo> {
        self.maps.pod_info(id)
    }

    /// Every enabled pod's id and identity record (cheap: one map walk, no rules read).
    pub fn infos(&self) -> Vec<(u32, PodInfo)> {
        self.maps.pod_infos()
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
                self.maps
                    .take_netns_probe(sock_cookie)
                    .ok_or_else(|| Error::NoCookie {
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
        // Asked once: the inode number alone can be a dead pod's, reused (see `Netns::is`).
        let cookie = netns.cookie();
        Ok(self.infos().into_iter().find(|(_, i)| {
            netns.same_as(i.netns_dev, i.netns_ino)
                && (i.netns_cookie == 0 || cookie.is_none_or(|c| c == i.netns_cookie))
        }))
    }

    fn find(&self, pod: &PodRef) -> Result<Option<(u32, PodInfo)>, Error> {
        match pod {
            PodRef::Id(id) => Ok(self.maps.pod_info(*id).map(|i| (*id, i))),
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
        let used = self.maps.pod_ids();
        // The pinned maps' own size: an agent adopting maps made by an older build with fewer
        // slots must not hand out ids they cannot hold.
        let capacity = self.maps.pod_capacity();
        (1..=capacity)
            .find(|id| !used.contains(id))
            .ok_or(Error::Full(capacity))
    }

    /// Fails if another live pod owns one of these addresses; takes them over from dead pods
    /// (IP reuse after a pod went away without being disabled).
    fn claim_addresses(&mut self, cookie: u64, addresses: &[IpAddr]) -> Result<(), Error> {
        for ip in addresses {
            let Some(owner) = self.maps.address_owner(*ip) else {
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
                None => self.maps.forget_address(*ip),
            }
        }
        Ok(())
    }

    /// Removes every entry of a pod: the switch first, then its rules and its netns link.
    fn remove(&mut self, id: u32, cookie: u64) -> Result<(), Error> {
        self.maps.remove_pod_entries(id, cookie);
        bpf::attach::detach_pod(self.pins, id)?;
        iptables_mode::forget(self.pins, id);
        self.maps.remove_pod_info(id);
        Ok(())
    }
}

/// Whether the locked file is still the one at `path` (not removed or replaced meanwhile).
fn same_file(locked: &File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (locked.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
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

/// Every enabled pod, by id. Each table is read once: per-pod reads made `pod list` and
/// `status` O(pods²) (every pod read the node-wide tables whole, and walked `LISTENERS`).
pub fn list(pins: &Pins, maps: &Maps) -> Result<Vec<PodEntry>, Error> {
    let mut infos = maps.pod_infos();
    infos.sort_unstable_by_key(|(id, _)| *id);
    let configs = maps.pod_configs();
    let ebpf: Vec<(u32, u64)> = infos
        .iter()
        .filter(|(_, i)| i.mode != MODE_IPTABLES)
        .map(|(id, i)| (*id, i.netns_cookie))
        .collect();
    let mut rows = maps.pods_rows(&ebpf);
    let listeners = maps.pod_listeners(ListenerFamily::V4);
    let live = maps.listener_cookies();
    infos
        .into_iter()
        .map(|(id, info)| {
            if info.mode == MODE_IPTABLES {
                return iptables_mode::entry(pins, id, &info);
            }
            Ok(ebpf_entry(
                id,
                &info,
                configs.get(&info.netns_cookie).copied(),
                rows.remove(&id).unwrap_or_default(),
                listeners.get(&id).copied(),
                |cookie| live.contains(&cookie),
            ))
        })
        .collect()
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
        .pod_info(id)
        .ok_or_else(|| Error::NotEnabled(format!("pod id {id}")))?;
    if info.mode == MODE_IPTABLES {
        return iptables_mode::entry(pins, id, &info);
    }
    Ok(ebpf_entry(
        id,
        &info,
        maps.pod_config(info.netns_cookie),
        maps.pod_rows(id, info.netns_cookie),
        maps.pod_listener(id, ListenerFamily::V4),
        |cookie| maps.has_listener(cookie),
    ))
}

/// An eBPF-mode pod's entry from what the maps hold of it.
fn ebpf_entry(
    id: u32,
    info: &PodInfo,
    config: Option<PodConfig>,
    rows: PodRows,
    listener: Option<u64>,
    listening: impl Fn(u64) -> bool,
) -> PodEntry {
    let inbound = config.is_some_and(|c| c.flags & POD_INBOUND != 0);
    PodEntry {
        id,
        name: pod_name(info),
        source: source_name(info),
        mode: "ebpf",
        backend: None,
        netns_cookie: info.netns_cookie,
        addresses: rows.addresses.clone(),
        outbound: config.is_some_and(|c| c.flags & POD_OUTBOUND != 0),
        inbound,
        inbound_listener: listener,
        inbound_ready: inbound && listener.is_some_and(listening),
        spec: datapath::read_spec(config.as_ref(), &rows),
    }
}

/// A path to the pod's network namespace if it still exists.
/// Where the pod said its namespace is: its `/run/netns` name or its process's `ns/net`.
fn primary_path(info: &PodInfo) -> Option<PathBuf> {
    match info.source {
        SOURCE_NETNS => Some(PathBuf::from(netns::NETNS_RUN_DIR).join(pod_name(info))),
        SOURCE_PID | SOURCE_KUBERNETES => Some(PathBuf::from(format!("/proc/{}/ns/net", info.pid))),
        _ => None,
    }
}

pub fn locate(info: &PodInfo) -> Option<PathBuf> {
    let same = |p: &PathBuf| is_pods_netns(info, p);
    // Alone, a walk of /proc that stops at the first process found in the namespace.
    primary_path(info).filter(same).or_else(|| {
        netns::processes_in(info.netns_dev, info.netns_ino)
            .map(|(_, dir)| dir.join("ns/net"))
            .find(same)
    })
}

/// As [`locate`], with the processes' namespaces of a pass (`owners`: one walk of /proc for
/// all the pods it is asked about).
fn locate_with(info: &PodInfo, owners: &mut NetnsOwners) -> Option<PathBuf> {
    let same = |p: &PathBuf| is_pods_netns(info, p);
    primary_path(info)
        .filter(same)
        .or_else(|| owners.find(info.netns_dev, info.netns_ino, same))
}

/// Whether `path` opens the pod's namespace (a newcomer that inherited its inode number has
/// another cookie).
fn is_pods_netns(info: &PodInfo, path: &PathBuf) -> bool {
    Netns::open(path).is_ok_and(|ns| ns.is(info.netns_dev, info.netns_ino, info.netns_cookie))
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
