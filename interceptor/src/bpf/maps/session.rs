//! The pod tables as one registry writer sees them while it holds the registry's lock.
//!
//! Every writer of the pod tables (`POD_INFO`, `POD_PORTS`, the CIDR tries, `POD_IPS`) and
//! every user-space writer of `LISTENERS` takes that lock (`Registry::lock`), so while one
//! holds it only that process changes them, besides the kernel dropping closed sockets from
//! `LISTENERS`. A session reads each table once, when first asked, and then follows this
//! process's own writes. Without it each `pod enable` read every table whole (and walked
//! `LISTENERS` key by key, three times), so an agent that re-enables every pod after a restart
//! did O(pods²) work: 49 ms per pod at 10 000 pods in the node-scale benchmark.
//!
//! A write that fails part-way forgets the table it was writing (read again when next asked).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use interceptor_common::pod::PodInfo;

use super::{PodRows, PortRule, Range};

/// What a session has read so far; `None`: not read yet (or forgotten after a failed write).
#[derive(Default)]
pub(super) struct Session {
    pub(super) infos: Option<BTreeMap<u32, PodInfo>>,
    pub(super) rows: Option<Tables>,
    pub(super) listeners: Option<HashSet<u64>>,
}

/// Every pod's rows: ports and ranges by pod id, addresses by the owner's netns cookie (the
/// keys the maps themselves use).
#[derive(Default)]
pub(super) struct Tables {
    by_pod: HashMap<u32, Keyed>,
    addresses: HashMap<u64, Vec<IpAddr>>,
}

#[derive(Default)]
struct Keyed {
    ports: Vec<PortRule>,
    excluded: Vec<Range>,
    included: Vec<Range>,
}

impl Tables {
    pub(super) fn add_port(&mut self, pod: u32, rule: PortRule) {
        let ports = &mut self.by_pod.entry(pod).or_default().ports;
        // One rule per (port, direction): the map's key.
        ports.retain(|r| (r.port, r.direction) != (rule.port, rule.direction));
        ports.push(rule);
    }

    pub(super) fn add_range(&mut self, pod: u32, excluded: bool, range: Range) {
        let keyed = self.by_pod.entry(pod).or_default();
        let ranges = if excluded {
            &mut keyed.excluded
        } else {
            &mut keyed.included
        };
        if !ranges.contains(&range) {
            ranges.push(range);
        }
    }

    pub(super) fn add_address(&mut self, cookie: u64, ip: IpAddr) {
        // An address has one owner: the map's key.
        self.forget_address(ip);
        self.addresses.entry(cookie).or_default().push(ip);
    }

    /// As read from `POD_IPS`, where each address is one key.
    pub(super) fn push_address(&mut self, cookie: u64, ip: IpAddr) {
        self.addresses.entry(cookie).or_default().push(ip);
    }

    pub(super) fn forget_address(&mut self, ip: IpAddr) {
        for addresses in self.addresses.values_mut() {
            addresses.retain(|a| *a != ip);
        }
    }

    /// The pod's rows, sorted as `Maps::pod_rows` returns them.
    pub(super) fn rows(&self, pod: u32, cookie: u64) -> PodRows {
        let mut rows = PodRows::default();
        if let Some(k) = self.by_pod.get(&pod) {
            rows.ports.clone_from(&k.ports);
            rows.excluded.clone_from(&k.excluded);
            rows.included.clone_from(&k.included);
        }
        if let Some(a) = self.addresses.get(&cookie) {
            rows.addresses.clone_from(a);
        }
        rows.ports
            .sort_unstable_by_key(|r| (r.direction, r.port, r.rule));
        rows.excluded.sort_unstable();
        rows.included.sort_unstable();
        rows.addresses.sort_unstable();
        rows
    }

    /// Keeps only what `keep` has of the pod (after its stale rows were deleted).
    pub(super) fn retain(&mut self, pod: u32, cookie: u64, keep: &PodRows) {
        if let Some(k) = self.by_pod.get_mut(&pod) {
            k.ports.retain(|r| {
                keep.ports
                    .iter()
                    .any(|w| (w.port, w.direction) == (r.port, r.direction))
            });
            k.excluded.retain(|r| keep.excluded.contains(r));
            k.included.retain(|r| keep.included.contains(r));
        }
        if let Some(a) = self.addresses.get_mut(&cookie) {
            a.retain(|ip| keep.addresses.contains(ip));
        }
    }
}
