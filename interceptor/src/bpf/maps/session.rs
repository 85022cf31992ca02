//! The pod tables as one registry writer sees them while it holds the registry's lock.
//!
//! Every writer of the pod tables (`POD_INFO`, `POD_PORTS`, the CIDR tries, `POD_IPS`) takes
//! that lock (`Registry::lock`), so while one holds it only that process changes them. A
//! session reads each table once, when first asked, and then follows this process's own
//! writes. `LISTENERS` is different: sockops adds a listener at listen() and the kernel drops
//! one at close, at any time. Its walk is kept only briefly (`LISTENERS_FRESH`); a miss older
//! than that walks again. Without it each `pod enable` read every table whole (and walked
//! `LISTENERS` key by key, three times), so an agent that re-enables every pod after a restart
//! did O(pods²) work: 49 ms per pod at 10 000 pods in the node-scale benchmark.
//!
//! A write that fails part-way forgets the table it was writing (read again when next asked).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use interceptor_common::pod::PodInfo;

use super::{PodRows, PortRule, Range};

/// What a session has read so far; `None`: not read yet (or forgotten after a failed write).
#[derive(Default)]
pub(super) struct Session {
    pub(super) infos: Option<BTreeMap<u32, PodInfo>>,
    pub(super) rows: Option<Tables>,
    /// The cookies of the last walk of `LISTENERS` and when it was taken.
    pub(super) listeners: Option<(HashSet<u64>, Instant)>,
}

/// How long a walk of `LISTENERS` answers for: a proxy that listens after it is missed by the
/// walk (its pod then borrows the socket, needing CAP_SYS_PTRACE), so a miss walks again once
/// this old. Short enough for a proxy starting during a long pass, long enough that a pass over
/// thousands of pods without listeners does not walk once per pod.
pub(super) const LISTENERS_FRESH: Duration = Duration::from_millis(100);

/// Every pod's rows: ports and ranges by pod id, addresses by the owner's netns cookie (the
/// keys the maps themselves use).
#[derive(Default)]
pub(super) struct Tables {
    by_pod: HashMap<u32, Keyed>,
    addresses: HashMap<u64, Vec<IpAddr>>,
    /// Each address's owner (`POD_IPS`' value), to move an address in O(1).
    owner: HashMap<IpAddr, u64>,
}

#[derive(Default)]
struct Keyed {
    ports: Vec<PortRule>,
    excluded: Vec<Range>,
    included: Vec<Range>,
}

impl Tables {
    /// Ids that have ports or ranges.
    pub(super) fn pods(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_pod
            .iter()
            .filter(|(_, k)| {
                !(k.ports.is_empty() && k.excluded.is_empty() && k.included.is_empty())
            })
            .map(|(id, _)| *id)
    }

    pub(super) fn add_port(&mut self, pod: u32, rule: PortRule) {
        let ports = &mut self.by_pod.entry(pod).or_default().ports;
        // One rule per (port, direction): the map's key.
        ports.retain(|r| (r.port, r.direction) != (rule.port, rule.direction));
        ports.push(rule);
    }

    pub(super) fn add_range(&mut self, pod: u32, excluded: bool, range: Range) {
        let range = canonical(range);
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

    /// An address has one owner: the map's key.
    pub(super) fn add_address(&mut self, cookie: u64, ip: IpAddr) {
        if self.owner.get(&ip) == Some(&cookie) {
            return;
        }
        self.forget_address(ip);
        self.owner.insert(ip, cookie);
        self.addresses.entry(cookie).or_default().push(ip);
    }

    pub(super) fn forget_address(&mut self, ip: IpAddr) {
        if let Some(cookie) = self.owner.remove(&ip)
            && let Some(addresses) = self.addresses.get_mut(&cookie)
        {
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
        rows.sort();
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
            k.excluded
                .retain(|r| keep.excluded.iter().any(|w| canonical(*w) == *r));
            k.included
                .retain(|r| keep.included.iter().any(|w| canonical(*w) == *r));
        }
        if let Some(a) = self.addresses.get_mut(&cookie) {
            let owner = &mut self.owner;
            a.retain(|ip| {
                let kept = keep.addresses.contains(ip);
                if !kept {
                    owner.remove(ip);
                }
                kept
            });
        }
    }
}

/// A range as the LPM trie tells keys apart: by its prefix bits only, so `10.1.2.3/8` and
/// `10.0.0.0/8` are one key (an older build wrote ranges with host bits set). Comparing ranges
/// unmasked, a session took one for stale and deleted the other, the one just written.
pub(super) fn canonical((ip, prefix): Range) -> Range {
    let ip = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    (ip, prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compare_as_the_trie_keys_them() {
        let r = |s: &str, p| (s.parse::<IpAddr>().unwrap(), p);
        assert_eq!(canonical(r("10.1.2.3", 8)), r("10.0.0.0", 8));
        assert_eq!(canonical(r("10.1.2.3", 32)), r("10.1.2.3", 32));
        assert_eq!(canonical(r("10.1.2.3", 0)), r("0.0.0.0", 0));
        assert_eq!(
            canonical(r("fd00:198:18:99::1", 64)),
            r("fd00:198:18:99::", 64)
        );
        assert_eq!(canonical(r("::1", 0)), r("::", 0));

        // A range written with host bits, then the same range masked: one row, not two, and
        // keeping the masked one keeps it.
        let mut t = Tables::default();
        t.add_range(1, true, r("10.1.2.3", 8));
        t.add_range(1, true, r("10.0.0.0", 8));
        assert_eq!(t.rows(1, 0).excluded, vec![r("10.0.0.0", 8)]);
        let keep = PodRows {
            excluded: vec![r("10.0.0.0", 8)],
            ..PodRows::default()
        };
        t.retain(1, 0, &keep);
        assert_eq!(t.rows(1, 0).excluded, vec![r("10.0.0.0", 8)]);
    }

    #[test]
    fn rows_as_stored_are_what_a_read_back_returns() {
        let r = |s: &str, p| (s.parse::<IpAddr>().unwrap(), p);
        let rule = |port, rule| PortRule {
            port,
            direction: 1,
            rule,
        };
        let written = PodRows {
            ports: vec![rule(9000, 1), rule(80, 2), rule(9000, 2)],
            excluded: vec![r("10.1.2.3", 8), r("10.0.0.0", 8), r("192.168.0.0", 16)],
            included: vec![],
            addresses: vec![r("198.18.0.2", 32).0, r("198.18.0.1", 32).0],
        };
        let mut t = Tables::default();
        for p in &written.ports {
            t.add_port(3, *p);
        }
        for e in &written.excluded {
            t.add_range(3, true, *e);
        }
        for a in &written.addresses {
            t.add_address(42, *a);
        }
        let stored = written.as_stored();
        assert_eq!(stored, t.rows(3, 42));
        assert_eq!(stored.ports, vec![rule(80, 2), rule(9000, 2)]);
        assert_eq!(
            stored.excluded,
            vec![r("10.0.0.0", 8), r("192.168.0.0", 16)]
        );
    }

    #[test]
    fn an_address_has_one_owner() {
        let ip: IpAddr = "198.18.0.7".parse().unwrap();
        let mut t = Tables::default();
        t.add_address(1, ip);
        t.add_address(2, ip);
        assert!(t.rows(0, 1).addresses.is_empty());
        assert_eq!(t.rows(0, 2).addresses, vec![ip]);
        t.forget_address(ip);
        assert!(t.rows(0, 2).addresses.is_empty());
    }
}
