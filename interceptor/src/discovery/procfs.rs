//! Finding a Kubernetes pod on this node: kubelet puts every container of a pod under a cgroup
//! whose path carries the pod UID (`kubepods-besteffort-pod<uid with _>.slice` with the systemd
//! driver, `kubepods/besteffort/pod<uid>` with cgroupfs), so `/proc/*/cgroup` names the pod's
//! processes and `/proc/PID/ns/net` its network namespace. When no cgroup path carries the UID
//! (an unusual runtime layout), the pod IP found inside exactly one namespace names it instead.
//! A namespace that is the node's own is never returned.

use std::{
    collections::HashMap,
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use tracing::debug;

use crate::discovery::netns::{self, Netns};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no process of pod uid {uid} runs on this node yet (not started, or its cgroup path does \
         not carry the UID and its IP is not known yet)"
    )]
    NotRunning { uid: String },
    #[error(
        "process {pid} of the pod lives in the node's own network namespace: refusing to \
         intercept it"
    )]
    HostNetns { pid: u32 },
    #[error("pod IP {ip} is configured in {count} network namespaces on this node: ambiguous")]
    Ambiguous { ip: IpAddr, count: usize },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// A network namespace identity: nsfs device and inode.
pub type NsId = (u64, u64);

/// A pod found on the node.
#[derive(Debug)]
pub struct Located {
    /// A process of the pod (the lowest pid: usually the sandbox, which lives longest).
    pub pid: u32,
    pub netns: Netns,
    /// Found by IP rather than by cgroup path.
    pub by_ip: bool,
}

/// One pass over `/proc`: pod UID → pids, and each process's network namespace. Built once per
/// reconcile pass and only when some pod needs locating.
#[derive(Debug)]
pub struct ProcIndex {
    proc_root: PathBuf,
    by_uid: HashMap<String, Vec<u32>>,
    /// The node's namespaces (pid 1's and our own): never a pod's.
    host: Vec<NsId>,
    /// Addresses seen inside each namespace, filled on demand by the IP fallback.
    addresses: Mutex<HashMap<NsId, Vec<IpAddr>>>,
}

impl ProcIndex {
    pub fn scan(proc_root: &Path) -> Self {
        let mut by_uid: HashMap<String, Vec<u32>> = HashMap::new();
        for pid in pids(proc_root) {
            let Ok(text) = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
            else {
                continue;
            };
            if let Some(uid) = text.lines().find_map(uid_in_cgroup_line) {
                by_uid.entry(uid).or_default().push(pid);
            }
        }
        for pids in by_uid.values_mut() {
            pids.sort_unstable();
        }
        let host = ["1", "self"]
            .iter()
            .filter_map(|p| ns_id(&proc_root.join(p).join("ns/net")))
            .collect();
        Self {
            proc_root: proc_root.to_owned(),
            by_uid,
            host,
            addresses: Mutex::default(),
        }
    }

    /// The processes whose cgroup path carries this pod UID.
    pub fn pids(&self, uid: &str) -> &[u32] {
        self.by_uid
            .get(&uid.to_ascii_lowercase())
            .map_or(&[], Vec::as_slice)
    }

    fn netns_path(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("ns/net")
    }

    /// Finds the pod with this UID (and, as a fallback, these IPs).
    pub fn locate(&self, uid: &str, pod_ips: &[IpAddr]) -> Result<Located, Error> {
        let mut refused = None;
        for &pid in self.pids(uid) {
            let path = self.netns_path(pid);
            let Some(id) = ns_id(&path) else { continue };
            if self.host.contains(&id) {
                refused = Some(pid);
                continue;
            }
            match Netns::open(&path) {
                Ok(netns) if netns.same_as(id.0, id.1) => {
                    return Ok(Located {
                        pid,
                        netns,
                        by_ip: false,
                    });
                }
                // The process exited between the stat and the open: try the next one.
                Ok(_) | Err(_) => continue,
            }
        }
        if let Some(pid) = refused {
            return Err(Error::HostNetns { pid });
        }
        for ip in pod_ips {
            if let Some(found) = self.locate_by_ip(*ip)? {
                return Ok(found);
            }
        }
        Err(Error::NotRunning {
            uid: uid.to_owned(),
        })
    }

    /// The one non-node namespace holding `ip`, entering each namespace once per pass.
    fn locate_by_ip(&self, ip: IpAddr) -> Result<Option<Located>, Error> {
        let mut seen: HashMap<NsId, u32> = HashMap::new();
        for pid in pids(&self.proc_root) {
            if let Some(id) = ns_id(&self.netns_path(pid))
                && !self.host.contains(&id)
            {
                seen.entry(id).or_insert(pid);
            }
        }
        let mut holders = Vec::new();
        for (id, pid) in seen {
            let cached = self.cached_addresses(id);
            let addresses = match cached {
                Some(a) => a,
                None => {
                    let Ok(netns) = Netns::open(self.netns_path(pid)) else {
                        continue;
                    };
                    let addresses = netns
                        .run(netns::pod_addresses)
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    if let Ok(mut cache) = self.addresses.lock() {
                        cache.insert(id, addresses.clone());
                    }
                    addresses
                }
            };
            if addresses.contains(&ip) {
                holders.push((id, pid));
            }
        }
        match holders.as_slice() {
            [] => Ok(None),
            [(id, pid)] => {
                let netns = Netns::open(self.netns_path(*pid))?;
                if !netns.same_as(id.0, id.1) {
                    return Ok(None);
                }
                debug!(%ip, pid, "pod located by its IP");
                Ok(Some(Located {
                    pid: *pid,
                    netns,
                    by_ip: true,
                }))
            }
            many => Err(Error::Ambiguous {
                ip,
                count: many.len(),
            }),
        }
    }

    fn cached_addresses(&self, id: NsId) -> Option<Vec<IpAddr>> {
        self.addresses.lock().ok()?.get(&id).cloned()
    }
}

/// Whether `pid` still lives in the namespace `id` (cheap: one stat).
pub fn still_in(proc_root: &Path, pid: u32, id: NsId) -> bool {
    ns_id(&proc_root.join(pid.to_string()).join("ns/net")) == Some(id)
}

fn ns_id(path: &Path) -> Option<NsId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn pids(proc_root: &Path) -> impl Iterator<Item = u32> {
    fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// The pod UID in one line of `/proc/PID/cgroup` (`0::/kubepods.slice/…`, or a v1 line
/// `4:memory:/kubepods/…`), lower-case with dashes; the deepest component that names one wins.
pub fn uid_in_cgroup_line(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').rev().find_map(uid_in_component)
}

/// `pod<uid>` (cgroupfs driver) or `kubepods[-<qos>]-pod<uid with _>.slice` (systemd driver).
fn uid_in_component(component: &str) -> Option<String> {
    let candidate = if let Some(rest) = component.strip_prefix("pod") {
        rest.to_owned()
    } else {
        let slice = component.strip_suffix(".slice")?;
        if !slice.starts_with("kubepods") {
            return None;
        }
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    };
    is_uid(&candidate).then(|| candidate.to_ascii_lowercase())
}

/// A Kubernetes UID: an RFC 4122 UUID in its 36-character form.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn systemd_driver_paths() {
        let line = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-4e5f.scope";
        assert_eq!(uid_in_cgroup_line(line).as_deref(), Some(UID));
        // Guaranteed QoS has no QoS slice.
        let line = "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/crio-1.scope";
        assert_eq!(uid_in_cgroup_line(line).as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_and_v1_paths() {
        let line = "0::/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/4e5f";
        assert_eq!(uid_in_cgroup_line(line).as_deref(), Some(UID));
        let line = "7:memory:/kubepods/pod0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0/abc";
        assert_eq!(uid_in_cgroup_line(line).as_deref(), Some(UID));
        // Seen through a cgroup namespace from another pod.
        let line = "0::/../../kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/x";
        assert_eq!(uid_in_cgroup_line(line).as_deref(), Some(UID));
    }

    #[test]
    fn other_paths_name_no_pod() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-0.slice/session-1.scope",
            "0::/kubepods.slice/kubepods-besteffort.slice",
            "0::/podman/pod-abc",
            "0::/pods/pod123",
            "0::/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fZ/x",
            "garbage",
        ] {
            assert_eq!(uid_in_cgroup_line(line), None, "{line}");
        }
    }

    #[test]
    fn the_scan_finds_this_process_by_a_fake_proc_tree() {
        // A /proc look-alike: pid 42 in a pod cgroup, pid 7 elsewhere, and our own ns files.
        let dir = std::env::temp_dir().join(format!("icpt-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (pid, cgroup) in [
            ("42", format!("0::/kubepods/besteffort/pod{UID}/c1\n")),
            ("7", "0::/system.slice/sshd.service\n".to_owned()),
        ] {
            fs::create_dir_all(dir.join(pid)).unwrap();
            fs::write(dir.join(pid).join("cgroup"), cgroup).unwrap();
        }
        let index = ProcIndex::scan(&dir);
        assert_eq!(index.pids(UID), &[42]);
        assert_eq!(index.pids(&UID.to_ascii_uppercase()), &[42]);
        assert!(
            index
                .pids("00000000-0000-0000-0000-000000000000")
                .is_empty()
        );
        // No ns file for pid 42 in the fake tree: it cannot be located.
        assert!(matches!(
            index.locate(UID, &[]),
            Err(Error::NotRunning { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
