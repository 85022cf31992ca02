//! How full each pinned map is: entries against capacity, and the kernel memory it holds. A map
//! that fills up makes the datapath fall back (a pod cannot be enabled, a connection is not
//! redirected), so `status` shows it and the node-scale benchmark measures it.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{MapInfo, MapType};
use interceptor_common::names;
use serde::Serialize;

use super::{Pins, sys};

/// One pinned map's use.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MapUse {
    pub name: &'static str,
    /// Keys it holds now; None for arrays and ring buffers (every slot always exists).
    pub entries: Option<usize>,
    pub capacity: u32,
    /// Kernel memory charged for the map (`memlock` in its fdinfo), bytes.
    pub memlock_bytes: Option<u64>,
}

impl MapUse {
    /// Percent of capacity in use, for maps that have keys.
    pub fn percent(&self) -> Option<f64> {
        self.entries
            .map(|n| 100.0 * n as f64 / f64::from(self.capacity.max(1)))
    }
}

/// Every pinned map under `pins`, in `names::map::PINNED` order, then the previous ABI's
/// connection maps (`names::map::PREVIOUS`: after a migration, entries the old programs wrote
/// that the catch-up could not carry over); maps not pinned are skipped.
pub fn occupancy(pins: &Pins) -> Vec<MapUse> {
    names::map::PINNED
        .iter()
        .chain(names::map::PREVIOUS)
        .filter_map(|&name| map_use(pins, name))
        .collect()
}

/// One map's use, or None if it is not pinned (or cannot be read).
pub fn map_use(pins: &Pins, name: &'static str) -> Option<MapUse> {
    let info = MapInfo::from_pin(pins.map(name)).ok()?;
    let fd = info.fd().ok()?;
    let capacity = info.max_entries();
    let keyed = matches!(
        info.map_type(),
        Ok(MapType::Hash
            | MapType::LruHash
            | MapType::PerCpuHash
            | MapType::LruPerCpuHash
            | MapType::LpmTrie
            | MapType::SockHash)
    );
    let entries = if keyed {
        // Twice the capacity: a walk racing deletions restarts, it must still end.
        sys::count_keys(fd.as_fd(), info.key_size() as usize, 2 * capacity as usize).ok()
    } else {
        None
    };
    Some(MapUse {
        name,
        entries,
        capacity,
        memlock_bytes: memlock(fd.as_fd().as_raw_fd()),
    })
}

/// `memlock:` of a bpf map descriptor's fdinfo.
fn memlock(fd: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}
