//! What the running kernel offers the datapath, probed the way libbpf does (load a minimal
//! program of each type / calling each helper). `interceptor status` reports it; the agent
//! decides with it what it can promise.

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

/// Everything probed, with the feature each datapath piece depends on.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Features {
    /// `uname -r`.
    pub kernel: String,
    /// Where cgroup v2 is mounted, if it is.
    pub cgroup2: Option<PathBuf>,
    /// Whether bpffs is mounted at /sys/fs/bpf.
    pub bpffs: bool,
    /// Program and map types and helpers by name: true = supported.
    pub probes: BTreeMap<String, bool>,
    /// The variant of each datapath piece this kernel gets (what the matrix reports).
    pub in_use: Vec<String>,
}

impl Features {
    pub fn probe() -> Self {
        let mut probes = BTreeMap::new();
        let mut program = |name: &str, ty| {
            probes.insert(name.to_owned(), is_program_supported(ty).unwrap_or(false));
        };
        program("prog_cgroup_sock_addr", ProgramType::CgroupSockAddr);
        program("prog_sock_ops", ProgramType::SockOps);
        program("prog_sk_msg", ProgramType::SkMsg);
        program("prog_cgroup_sockopt", ProgramType::CgroupSockopt);
        program("prog_sk_lookup", ProgramType::SkLookup);
        let mut map = |name: &str, ty| {
            probes.insert(name.to_owned(), is_map_supported(ty).unwrap_or(false));
        };
        map("map_sockhash", MapType::SockHash);
        map("map_lpm_trie", MapType::LpmTrie);
        map("map_lru_hash", MapType::LruHash);
        map("map_ringbuf", MapType::RingBuf);
        let mut helper = |name: &str, ty, h| {
            probes.insert(name.to_owned(), is_helper_supported(ty, h).unwrap_or(false));
        };
        helper(
            "helper_netns_cookie_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        );
        for (name, ty) in NETNS_KEY_PROGRAMS {
            helper(name, ty, BpfHelper::BPF_FUNC_get_netns_cookie);
        }
        helper(
            "helper_bind_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_bind,
        );
        helper(
            "helper_socket_cookie_sock_ops",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        );
        helper(
            "helper_msg_redirect_hash",
            ProgramType::SkMsg,
            BpfHelper::BPF_FUNC_msg_redirect_hash,
        );
        helper(
            "helper_sk_assign_sk_lookup",
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_sk_assign,
        );
        probes.insert(
            "sockopt_netns_cookie".to_owned(),
            matches!(crate::discovery::netns::current_cookie(), Ok(Some(_))),
        );
        let mut features = Self {
            kernel: kernel_release(),
            cgroup2: cgroup2_mount(),
            bpffs: bpffs_mounted(),
            probes,
            in_use: Vec::new(),
        };
        features.in_use = features.variants().into_iter().map(str::to_owned).collect();
        features
    }

    /// What the running agent of `pins` probed and chose (it records that at start), else a
    /// fresh probe: `status` then reports the agent's view and costs no probe programs.
    pub fn of_instance(pins: &crate::bpf::Pins) -> Self {
        std::fs::read(Self::record_path(pins))
            .ok()
            .filter(|_| pins.is_live())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(Self::probe)
    }

    /// Records what this agent probed and chose, for `of_instance`.
    pub fn record(&self, pins: &crate::bpf::Pins) -> std::io::Result<()> {
        let path = Self::record_path(pins);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            path,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }

    fn record_path(pins: &crate::bpf::Pins) -> std::path::PathBuf {
        pins.run_dir().join("features.json")
    }

    /// Which variant of each piece runs here. Only choices the agent makes are listed: a
    /// missing requirement stops the agent instead (see `missing_for_outbound`).
    fn variants(&self) -> Vec<&'static str> {
        let mut v = vec!["connect4/6", "getsockopt", "sockops+sk_msg"];
        v.push(if self.inbound() {
            "sk_lookup inbound"
        } else {
            "no inbound (no sk_lookup)"
        });
        v.push(if self.has("sockopt_netns_cookie") {
            "netns cookie: SO_NETNS_COOKIE"
        } else {
            "netns cookie: connect4 probe"
        });
        v.push(if self.netns_keys() {
            "tuple keys: 4-tuple + netns cookie (bound sockets redirected)"
        } else {
            "tuple keys: 4-tuple, pod-unique source (bound sockets refused / fail-open)"
        });
        v.push(if self.pod_to_pod() {
            "pod→pod (same node): sidecar↔sidecar hop in the sockhash"
        } else {
            "pod→pod (same node): over the veths (no netns cookie in sockops/sk_msg, Linux < 5.15)"
        });
        v.push(if self.app_nodelay() {
            "app nodelay: TCP_NODELAY on in-pod hops"
        } else {
            "app nodelay: unavailable (bpf_setsockopt TCP_NODELAY needs Linux >= 6.1)"
        });
        // The load itself decides (see `attach_dns`); this is what the kernel's version says.
        v.push(if kernel_below(&self.kernel, (5, 2)) {
            "dns capture: iptables mode only (no cgroup recvmsg, Linux < 5.2)"
        } else {
            "dns capture: cgroup sendmsg/recvmsg + connect"
        });
        if !self.has("map_ringbuf") {
            v.push("no bpf log/events (no ringbuf)");
        }
        if kernel_below(&self.kernel, (5, 11)) {
            // Before memcg accounting, BPF memory counts against RLIMIT_MEMLOCK.
            v.push("memlock rlimit raised");
        }
        v
    }

    /// Whether every program that builds a sockhash / original-destination key can read the
    /// network-namespace cookie (Linux >= 5.15): then a connect is redirected whatever its
    /// socket was bound to; else only with a pod-unique source (see `connect_refused_source`).
    pub fn netns_keys(&self) -> bool {
        NETNS_KEY_PROGRAMS.iter().all(|(name, _)| self.has(name))
    }

    /// The same-node pod→pod short-circuit (sockops.rs `pod_to_pod`) keys its sockets
    /// node-wide, which only stays unique where every in-pod key holds a namespace cookie; its
    /// server end is a connection sk_lookup steered. Elsewhere that hop stays on TCP.
    pub fn pod_to_pod(&self) -> bool {
        self.netns_keys() && self.inbound()
    }

    /// TCP_NODELAY on in-pod hops (sockops.rs `app_nodelay`): `bpf_setsockopt` accepts
    /// `TCP_NODELAY` from Linux 6.1 (before, only a short list of SOL_TCP options, and it
    /// answers EINVAL), so the agent leaves `CONFIG_APP_NODELAY` off below.
    pub fn app_nodelay(&self) -> bool {
        !kernel_below(&self.kernel, (6, 1))
    }

    pub fn has(&self, probe: &str) -> bool {
        self.probes.get(probe).copied().unwrap_or(false)
    }

    /// Inbound capture needs sk_lookup (Linux >= 5.9).
    pub fn inbound(&self) -> bool {
        self.has("prog_sk_lookup") && self.has("helper_sk_assign_sk_lookup")
    }

    /// What is missing for outbound interception, if anything.
    pub fn missing_for_outbound(&self) -> Vec<&'static str> {
        [
            "prog_cgroup_sock_addr",
            "prog_sock_ops",
            "prog_sk_msg",
            "prog_cgroup_sockopt",
            "map_sockhash",
            "helper_netns_cookie_sock_addr",
            "helper_bind_sock_addr",
            "helper_msg_redirect_hash",
        ]
        .into_iter()
        .filter(|p| !self.has(p))
        .collect()
    }
}

/// The programs that put the network-namespace cookie into their keys when all of them can.
const NETNS_KEY_PROGRAMS: [(&str, ProgramType); 3] = [
    ("helper_netns_cookie_sock_ops", ProgramType::SockOps),
    ("helper_netns_cookie_sk_msg", ProgramType::SkMsg),
    ("helper_netns_cookie_sockopt", ProgramType::CgroupSockopt),
];

/// Whether a `uname -r` release is older than `(major, minor)`; unknown formats are not.
pub fn kernel_below(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => false,
    }
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
/// hybrid ones (these machines).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_src, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(target)))
    })
}

/// /proc/mounts escapes spaces and friends as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_kernel_releases() {
        assert!(kernel_below("5.10.0-46-cloud-amd64", (5, 11)));
        assert!(!kernel_below("6.1.0-56-cloud-amd64", (5, 11)));
        assert!(!kernel_below("6.12.117+deb12-cloud-amd64", (6, 5)));
        assert!(kernel_below("6.1.0-56-cloud-amd64", (6, 5)));
        assert!(!kernel_below("weird", (6, 5)));
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(unescape_mount(r"/sys/fs/cgroup\040x"), "/sys/fs/cgroup x");
        assert_eq!(
            unescape_mount("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
