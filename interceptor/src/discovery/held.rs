//! The agent's open descriptors of its pods' network namespaces, kept between passes.
//!
//! A pod is found again by its namespace's (device, inode) and, where the kernel has one, its
//! cookie: nsfs hands a freed namespace's inode number to the next namespace created, so (device,
//! inode) alone could name a newcomer. Reading the cookie means entering the namespace (a thread
//! and a `setns` per pod per pass: 66 ms per pass at 1 000 pods in the node-scale benchmark).
//! A namespace this process holds open cannot be freed, so its inode number cannot be reused:
//! while held, (device, inode) identifies it exactly and a pass needs only a `stat` per pod. The
//! cost: a pod's namespace lives until the pass after its last process and mount are gone
//! (the pass that sees it gone drops the descriptor), and one descriptor per pod.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use interceptor_common::pod::PodInfo;

use super::netns::{Netns, NetnsOwners};

#[derive(Default)]
pub struct HeldNamespaces {
    by_pod: HashMap<u32, Held>,
}

struct Held {
    dev: u64,
    ino: u64,
    cookie: u64,
    /// Keeps the namespace (and so its inode number) alive.
    _netns: Netns,
}

impl HeldNamespaces {
    /// Where pod `id`'s namespace is, or None if it is gone. `primary` is where the pod said it
    /// lives (its `/run/netns` name or `/proc/PID/ns/net`); `full` is the complete check used
    /// the first time (it may enter the namespace).
    pub fn locate(
        &mut self,
        id: u32,
        info: &PodInfo,
        primary: Option<PathBuf>,
        owners: &mut NetnsOwners,
        full: impl FnOnce(&mut NetnsOwners) -> Option<PathBuf>,
    ) -> Option<PathBuf> {
        if let Some(h) = self.by_pod.get(&id)
            && (h.dev, h.ino, h.cookie) == (info.netns_dev, info.netns_ino, info.netns_cookie)
        {
            let found = primary
                .filter(|p| same_inode(p, h.dev, h.ino))
                .or_else(|| owners.find(h.dev, h.ino, |p| same_inode(p, h.dev, h.ino)));
            if found.is_none() {
                self.by_pod.remove(&id);
            }
            return found;
        }
        let path = full(owners)?;
        // Verified again on the very descriptor held: the namespace `full` saw could have died
        // and its number gone to a newcomer between the two opens.
        if let Ok(ns) = Netns::open(&path)
            && ns.is(info.netns_dev, info.netns_ino, info.netns_cookie)
        {
            self.by_pod.insert(
                id,
                Held {
                    dev: info.netns_dev,
                    ino: info.netns_ino,
                    cookie: info.netns_cookie,
                    _netns: ns,
                },
            );
        }
        Some(path)
    }

    /// Drops what is held for pods no longer enabled.
    pub fn retain(&mut self, enabled: impl Fn(u32) -> bool) {
        self.by_pod.retain(|id, _| enabled(*id));
    }
}

fn same_inode(path: &Path, dev: u64, ino: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}
