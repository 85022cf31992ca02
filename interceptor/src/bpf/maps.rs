//! Typed handles to the pinned maps, for the agent and for every CLI command that talks to a
//! running datapath (`pod`, `status`).

use std::collections::BTreeMap;

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key as LpmKey,
};
use interceptor_common::{
    ABI_VERSION,
    addr::Addr,
    config::GlobalConfig,
    counters::Counter,
    names::map,
    pod::{CidrKey, PodConfig, PodInfo, PortKey},
    sockmap::SockKey,
};

use super::{Error, Pins};

/// Every map user space reads or writes (the ring buffers are opened by their consumers).
pub struct Maps {
    pub config: Array<MapData, GlobalConfig>,
    pub abi: Array<MapData, u32>,
    pub pod_config: HashMap<MapData, u64, PodConfig>,
    pub pod_ips: HashMap<MapData, Addr, u64>,
    pub pod_ports: HashMap<MapData, PortKey, u32>,
    pub cidr_exclude: LpmTrie<MapData, CidrKey, u32>,
    pub cidr_include: LpmTrie<MapData, CidrKey, u32>,
    pub pod_info: HashMap<MapData, u32, PodInfo>,
    pub pod_listener: HashMap<MapData, u32, u64>,
    pub pod_listener6: HashMap<MapData, u32, u64>,
    pub listeners: SockHash<MapData, u64>,
    pub socks: SockHash<MapData, SockKey>,
    pub counters: PerCpuArray<MapData, u64>,
    pub netns_probe: HashMap<MapData, u64, u64>,
}

/// Opens one pinned map as its typed handle.
pub(crate) fn open_pinned<T>(pins: &Pins, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pins.map(name);
    if !path.exists() {
        return Err(Error::MapNotPinned { map: name, path });
    }
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { map: name, source })?;
    let map = Map::from_map_data(data).map_err(|source| Error::Map { map: name, source })?;
    T::try_from(map).map_err(|source| Error::Map { map: name, source })
}

impl Maps {
    /// Opens the maps pinned under `pins` (an agent created them).
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        let maps = Self {
            config: open_pinned(pins, map::CONFIG)?,
            abi: open_pinned(pins, map::ABI)?,
            pod_config: open_pinned(pins, map::POD_CONFIG)?,
            pod_ips: open_pinned(pins, map::POD_IPS)?,
            pod_ports: open_pinned(pins, map::POD_PORTS)?,
            cidr_exclude: open_pinned(pins, map::CIDR_EXCLUDE)?,
            cidr_include: open_pinned(pins, map::CIDR_INCLUDE)?,
            pod_info: open_pinned(pins, map::POD_INFO)?,
            pod_listener: open_pinned(pins, map::POD_LISTENER)?,
            pod_listener6: open_pinned(pins, map::POD_LISTENER6)?,
            listeners: open_pinned(pins, map::LISTENERS)?,
            socks: open_pinned(pins, map::SOCKS)?,
            counters: open_pinned(pins, map::COUNTERS)?,
            netns_probe: open_pinned(pins, map::NETNS_PROBE)?,
        };
        maps.check_abi(pins)?;
        Ok(maps)
    }

    /// Refuses state written by an incompatible build. 0 = not written yet (fresh maps).
    pub(crate) fn check_abi(&self, pins: &Pins) -> Result<(), Error> {
        let found = self.abi.get(&0, 0).map_err(|source| Error::Map {
            map: map::ABI,
            source,
        })?;
        if found != 0 && found != ABI_VERSION {
            return Err(Error::AbiMismatch {
                path: pins.root().to_owned(),
                found,
                expected: ABI_VERSION,
            });
        }
        Ok(())
    }

    pub(crate) fn write_abi(&mut self) -> Result<(), Error> {
        self.abi
            .set(0, ABI_VERSION, 0)
            .map_err(|source| Error::Map {
                map: map::ABI,
                source,
            })
    }

    pub fn global_config(&self) -> Result<GlobalConfig, Error> {
        self.config.get(&0, 0).map_err(|source| Error::Map {
            map: map::CONFIG,
            source,
        })
    }

    pub fn set_global_config(&mut self, cfg: GlobalConfig) -> Result<(), Error> {
        self.config.set(0, cfg, 0).map_err(|source| Error::Map {
            map: map::CONFIG,
            source,
        })
    }

    /// Every counter, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>, Error> {
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let values = self
                .counters
                .get(&counter.index(), 0)
                .map_err(|source| Error::Map {
                    map: map::COUNTERS,
                    source,
                })?;
            out.insert(counter.name(), values.iter().sum());
        }
        Ok(out)
    }

    /// Adds one to a counter only user space writes (its per-CPU slots are summed anyway).
    pub fn bump(&mut self, counter: Counter) {
        let Ok(values) = self.counters.get(&counter.index(), 0) else {
            return;
        };
        let mut values: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = values.first_mut() {
            *first += 1;
        }
        if let Ok(values) = aya::maps::PerCpuValues::try_from(values) {
            let _ = self.counters.set(counter.index(), values, 0);
        }
    }

    /// Live entries of the app↔proxy sockhash.
    pub fn sockhash_entries(&self) -> usize {
        self.socks.keys().filter(Result::is_ok).count()
    }

    /// Whether a listening socket with this cookie is in the listener sockhash.
    pub fn has_listener(&self, cookie: u64) -> bool {
        self.listeners.keys().any(|k| k.is_ok_and(|k| k == cookie))
    }

    /// Cookies of every listener in `LISTENERS` (one map walk, for passes over many pods).
    pub fn listener_cookies(&self) -> std::collections::HashSet<u64> {
        self.listeners.keys().filter_map(Result::ok).collect()
    }
}

/// An LPM key matching `pod_id`, the `family` (`CIDR_V4`/`CIDR_V6`) and the first `bits` of
/// the 16-byte address.
pub(crate) fn cidr_key(pod_id: u32, family: u32, ip: Addr, bits: u32) -> LpmKey<CidrKey> {
    LpmKey::new(
        CidrKey::prefix_len(bits),
        CidrKey {
            pod_id_be: pod_id.to_be(),
            family,
            ip,
        },
    )
}
