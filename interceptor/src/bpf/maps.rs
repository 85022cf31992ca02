//! The pinned maps, for the agent and for every CLI command that talks to a running datapath
//! (`pod`, `status`). Callers get operations in user-space types (pod ids, `IpAddr`, ranges,
//! port rules); the key layouts (`CidrKey`'s LPM prefix, IPv4-mapped addresses) stay here and in
//! `interceptor-common`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    os::fd::AsRawFd,
    sync::{Mutex, PoisonError},
};

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key as LpmKey,
};
use interceptor_common::{
    ABI_VERSION,
    addr::{self, Addr},
    config::GlobalConfig,
    counters::Counter,
    names::map,
    pod::{CidrKey, PodConfig, PodInfo, PortKey},
    sockmap::SockKey,
};

use self::session::{LISTENERS_FRESH, Session, Tables, canonical};
use super::{Error, Pins};

mod session;

/// Every map user space reads or writes (the ring buffers are opened by their consumers).
pub struct Maps {
    config: Array<MapData, GlobalConfig>,
    abi: Array<MapData, u32>,
    pod_config: HashMap<MapData, u64, PodConfig>,
    pod_ips: HashMap<MapData, Addr, u64>,
    pod_ports: HashMap<MapData, PortKey, u32>,
    cidr_exclude: LpmTrie<MapData, CidrKey, u32>,
    cidr_include: LpmTrie<MapData, CidrKey, u32>,
    pod_info: HashMap<MapData, u32, PodInfo>,
    pod_listener: HashMap<MapData, u32, u64>,
    pod_listener6: HashMap<MapData, u32, u64>,
    listeners: SockHash<MapData, u64>,
    socks: SockHash<MapData, SockKey>,
    counters: PerCpuArray<MapData, u64>,
    netns_probe: HashMap<MapData, u64, u64>,
    /// Set while this process holds the registry's lock (`session.rs`).
    session: Mutex<Option<Session>>,
}

/// A range as the per-pod CIDR maps hold it: address and prefix in the address's own family.
pub type Range = (IpAddr, u8);

/// One port rule of a pod (`POD_PORTS`): `direction` is `DIR_INBOUND`/`DIR_OUTBOUND`, `rule`
/// `PORT_INCLUDE`/`PORT_EXCLUDE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRule {
    pub port: u16,
    pub direction: u16,
    pub rule: u32,
}

/// A pod's rows in the node-wide maps besides its config and identity: what an update replaces
/// and a failed update puts back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRows {
    pub ports: Vec<PortRule>,
    pub excluded: Vec<Range>,
    pub included: Vec<Range>,
    pub addresses: Vec<IpAddr>,
}

impl PodRows {
    /// These rows as the maps hold them once written and read back: one rule per (port,
    /// direction), ranges by their prefix bits, each once, sorted.
    pub(crate) fn as_stored(&self) -> PodRows {
        let mut t = Tables::default();
        for r in &self.ports {
            t.add_port(0, *r);
        }
        for r in &self.excluded {
            t.add_range(0, true, *r);
        }
        for r in &self.included {
            t.add_range(0, false, *r);
        }
        for ip in &self.addresses {
            t.add_address(0, *ip);
        }
        t.rows(0, 0)
    }

    /// In one order, so two reads of the same rows compare equal.
    pub(crate) fn sort(&mut self) {
        self.ports
            .sort_unstable_by_key(|r| (r.direction, r.port, r.rule));
        self.excluded.sort_unstable();
        self.included.sort_unstable();
        self.addresses.sort_unstable();
    }
}

/// A pod write that did not fit: which map refused it.
#[derive(Debug, thiserror::Error)]
#[error("writing map {map}: {source} (map full?)")]
pub struct WriteError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

fn write_err(map: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError { map, source }
}

/// Which inbound listener map: `POD_LISTENER` (IPv4, or a dual-stack socket) or
/// `POD_LISTENER6` (a separate IPv6 socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerFamily {
    V4,
    V6,
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
        let maps = Self::open_any_abi(pins)?;
        maps.check_abi(pins)?;
        Ok(maps)
    }

    /// Opens the maps of an older ABI being migrated (`bpf/migrate.rs`), to read the pod
    /// registry from. Only for ABIs whose registry maps have this build's key and value types
    /// (`registry::rebuild` says which).
    pub(crate) fn open_any_abi(pins: &Pins) -> Result<Self, Error> {
        Ok(Self {
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
            session: Mutex::new(None),
        })
    }

    /// Whether every handle is still the map pinned under its name. A migration (a new ABI)
    /// or `--replace` pins new maps in their place; a process that opened the old ones, then
    /// waited for the registry lock, would write maps no program reads any more.
    pub(crate) fn is_current(&self, pins: &Pins) -> bool {
        use aya::maps::IterableMap as _;
        let held: [(&str, &MapData); 14] = [
            (map::CONFIG, self.config.map()),
            (map::ABI, self.abi.map()),
            (map::POD_CONFIG, self.pod_config.map()),
            (map::POD_IPS, self.pod_ips.map()),
            (map::POD_PORTS, self.pod_ports.map()),
            (map::CIDR_EXCLUDE, self.cidr_exclude.map()),
            (map::CIDR_INCLUDE, self.cidr_include.map()),
            (map::POD_INFO, self.pod_info.map()),
            (map::POD_LISTENER, self.pod_listener.map()),
            (map::POD_LISTENER6, self.pod_listener6.map()),
            (map::LISTENERS, self.listeners.map()),
            (map::SOCKS, self.socks.map()),
            (map::COUNTERS, self.counters.map()),
            (map::NETNS_PROBE, self.netns_probe.map()),
        ];
        held.into_iter().all(|(name, data)| {
            let pinned = aya::maps::MapInfo::from_pin(pins.map(name)).map(|i| i.id());
            matches!((data.info().map(|i| i.id()), pinned), (Ok(a), Ok(b)) if a == b)
        })
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

    /// Whether a listening socket with this cookie is in the listener sockhash. The sockhash
    /// cannot be looked up by key from user space with 4-byte values; `sys::holds_key` asks
    /// with three `BPF_MAP_GET_NEXT_KEY` calls instead. Where that cannot answer, a walk does:
    /// in a registry session a recent walk answers; a miss walks again once it is
    /// `LISTENERS_FRESH` old (a proxy may have listened since).
    pub fn has_listener(&self, cookie: u64) -> bool {
        use std::os::fd::AsFd as _;
        if let Ok(found) = super::sys::holds_key(self.listeners.fd().as_fd(), &cookie.to_ne_bytes())
        {
            return found;
        }
        self.with_session(|s| {
            if let Some((seen, at)) = &s.listeners
                && (seen.contains(&cookie) || at.elapsed() < LISTENERS_FRESH)
            {
                return seen.contains(&cookie);
            }
            let seen = self.walk_listeners();
            let found = seen.contains(&cookie);
            s.listeners = Some((seen, std::time::Instant::now()));
            found
        })
        .unwrap_or_else(|| self.listeners.keys().any(|k| k.is_ok_and(|k| k == cookie)))
    }

    /// Cookies of every listener in `LISTENERS` (one map walk, for passes over many pods; in
    /// a registry session, a walk at most `LISTENERS_FRESH` old).
    pub fn listener_cookies(&self) -> std::collections::HashSet<u64> {
        self.with_session(|s| match &s.listeners {
            Some((seen, at)) if at.elapsed() < LISTENERS_FRESH => seen.clone(),
            _ => {
                let seen = self.walk_listeners();
                s.listeners = Some((seen.clone(), std::time::Instant::now()));
                seen
            }
        })
        .unwrap_or_else(|| self.walk_listeners())
    }

    fn walk_listeners(&self) -> HashSet<u64> {
        self.listeners.keys().filter_map(Result::ok).collect()
    }
}

/// Registry sessions: the pod tables read once per holder of the registry's lock
/// (`maps/session.rs` says why).
impl Maps {
    /// Starts a session; `Registry::lock` calls it once it holds the lock.
    pub(crate) fn begin_session(&mut self) {
        *self
            .session
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Some(Session::default());
    }

    /// Ends the session; dropping the registry calls it before releasing the lock.
    pub(crate) fn end_session(&mut self) {
        *self
            .session
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn with_session<R>(&self, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        session.as_mut().map(f)
    }

    /// Applies a write to what the session has read of the rows (nothing outside a session,
    /// or before the rows were read).
    fn note_rows(&self, f: impl FnOnce(&mut Tables)) {
        self.with_session(|s| s.rows.as_mut().map(f));
    }

    /// A write failed part-way: what the session has of these tables is no longer known.
    fn forget_rows(&self) {
        self.with_session(|s| s.rows = None);
    }

    /// Every pod's rows, one read of each table.
    fn read_tables(&self) -> Tables {
        let mut t = Tables::default();
        for (k, rule) in dump(&self.pod_ports) {
            t.add_port(
                k.pod_id,
                PortRule {
                    port: k.port,
                    direction: k.direction,
                    rule,
                },
            );
        }
        for (trie, excluded) in [(&self.cidr_exclude, true), (&self.cidr_include, false)] {
            for k in trie.keys().filter_map(Result::ok) {
                t.add_range(
                    k.data().pod_id(),
                    excluded,
                    k.data().to_range(k.prefix_len()),
                );
            }
        }
        for (a, cookie) in dump(&self.pod_ips) {
            t.add_address(cookie, addr::to_ip(a));
        }
        t
    }
}

/// Pods: identity records, configs, addresses.
impl Maps {
    /// Every enabled pod's id and identity record (one map walk; in a registry session, the
    /// session's one walk).
    pub fn pod_infos(&self) -> Vec<(u32, PodInfo)> {
        self.with_session(|s| {
            s.infos
                .get_or_insert_with(|| dump(&self.pod_info).into_iter().collect())
                .iter()
                .map(|(id, info)| (*id, *info))
                .collect()
        })
        .unwrap_or_else(|| dump(&self.pod_info))
    }

    pub fn pod_info(&self, id: u32) -> Option<PodInfo> {
        self.pod_info.get(&id, 0).ok()
    }

    /// How many pods the pinned maps can hold: the smallest of the per-pod maps' sizes (maps
    /// pinned by an older build may be smaller than this build's `size::PODS`).
    pub fn pod_capacity(&self) -> u32 {
        use aya::maps::IterableMap as _;
        [
            self.pod_info.map().info().map(|i| i.max_entries()),
            self.pod_config.map().info().map(|i| i.max_entries()),
        ]
        .into_iter()
        .map(|m| m.unwrap_or(interceptor_common::names::size::PODS))
        .min()
        .unwrap_or(interceptor_common::names::size::PODS)
    }

    /// Ids in use.
    pub fn pod_ids(&self) -> BTreeSet<u32> {
        self.pod_infos().into_iter().map(|(id, _)| id).collect()
    }

    pub fn put_pod_info(&mut self, id: u32, info: PodInfo) -> Result<(), WriteError> {
        let written = self
            .pod_info
            .insert(id, info, 0)
            .map_err(write_err(map::POD_INFO));
        self.with_session(|s| match (&written, s.infos.as_mut()) {
            (Ok(()), Some(infos)) => {
                infos.insert(id, info);
            }
            (Err(_), _) => s.infos = None,
            (Ok(()), None) => {}
        });
        written
    }

    pub fn remove_pod_info(&mut self, id: u32) {
        let _ = self.pod_info.remove(&id);
        self.with_session(|s| s.infos.as_mut().map(|infos| infos.remove(&id)));
    }

    /// Every pod's config by namespace cookie (one batched read).
    pub fn pod_configs(&self) -> std::collections::HashMap<u64, PodConfig> {
        dump(&self.pod_config).into_iter().collect()
    }

    /// The datapath config of the pod whose network namespace has this cookie.
    pub fn pod_config(&self, netns_cookie: u64) -> Option<PodConfig> {
        self.pod_config.get(&netns_cookie, 0).ok()
    }

    /// The netns cookie of the pod that owns `ip`.
    pub fn address_owner(&self, ip: IpAddr) -> Option<u64> {
        self.pod_ips.get(&addr::from_ip(ip), 0).ok()
    }

    pub fn forget_address(&mut self, ip: IpAddr) {
        let _ = self.pod_ips.remove(&addr::from_ip(ip));
        self.note_rows(|t| t.forget_address(ip));
    }

    /// The cookie connect4 recorded for a probe socket (kernels without `SO_NETNS_COOKIE`),
    /// taken out of the map.
    pub fn take_netns_probe(&mut self, socket_cookie: u64) -> Option<u64> {
        let found = self.netns_probe.get(&socket_cookie, 0).ok();
        let _ = self.netns_probe.remove(&socket_cookie);
        found
    }

    /// The pod's rows as the maps hold them (sorted, so they compare).
    pub fn pod_rows(&self, id: u32, netns_cookie: u64) -> PodRows {
        if let Some(rows) = self.with_session(|s| {
            s.rows
                .get_or_insert_with(|| self.read_tables())
                .rows(id, netns_cookie)
        }) {
            return rows;
        }
        let mut rows = PodRows {
            ports: dump(&self.pod_ports)
                .into_iter()
                .filter(|(k, _)| k.pod_id == id)
                .map(|(k, rule)| PortRule {
                    port: k.port,
                    direction: k.direction,
                    rule,
                })
                .collect(),
            excluded: ranges_of(&self.cidr_exclude, id),
            included: ranges_of(&self.cidr_include, id),
            addresses: dump(&self.pod_ips)
                .into_iter()
                .filter(|(_, c)| *c == netns_cookie)
                .map(|(a, _)| addr::to_ip(a))
                .collect(),
        };
        rows.sort();
        rows
    }

    /// Makes the pod's entries these: written as [`Maps::insert_pod`] does, then what an
    /// earlier version had and this one does not goes. Never less intercepted in between than
    /// before or after.
    pub fn write_pod(
        &mut self,
        id: u32,
        info: &PodInfo,
        config: &PodConfig,
        rows: &PodRows,
    ) -> Result<(), WriteError> {
        self.insert_pod(id, info, config, rows)?;
        self.drop_rows_except(id, info.netns_cookie, rows);
        Ok(())
    }

    /// Deletes the rows of pod ids that have no identity record (see [`Maps::insert_pod`]):
    /// one read of the tables. Returns how many pods had some.
    pub fn drop_orphan_rows(&mut self) -> usize {
        let live: HashSet<u32> = self.pod_ids().into_iter().collect();
        let orphans_in =
            |t: &Tables| -> Vec<u32> { t.pods().filter(|id| !live.contains(id)).collect() };
        let orphans = self
            .with_session(|s| orphans_in(s.rows.get_or_insert_with(|| self.read_tables())))
            .unwrap_or_else(|| orphans_in(&self.read_tables()));
        for &id in &orphans {
            // Addresses are keyed by the owner's cookie, which an orphan has none of: left to
            // `claim_addresses`, which frees an address whose owner is no pod.
            self.drop_rows_except(id, 0, &PodRows::default());
        }
        orphans.len()
    }

    /// The writing half of [`Maps::write_pod`]: the identity record first, then the rows, then
    /// the config that switches interception on (the record alone switches nothing on). Alone
    /// for maps that hold nothing else of the pod: a migration's rebuild, and a pod under an id
    /// no pod holds (`Registry::free_id`). There nothing of an earlier pod of that id is looked
    /// for or deleted, which keeps a lone `pod enable` from reading every pod's rows
    /// (`POD_PORTS` holds six per pod: 60 000 rows read for one pod at 10 000 pods). That rests
    /// on this order: a pod's rows are written after its identity record and deleted before it
    /// (`Registry::remove`), so an id without a record has no rows — even after a writer died
    /// part-way. Rows that an older build (rows first) left under a free id go at the agent's
    /// start ([`Maps::drop_orphan_rows`]).
    pub fn insert_pod(
        &mut self,
        id: u32,
        info: &PodInfo,
        config: &PodConfig,
        rows: &PodRows,
    ) -> Result<(), WriteError> {
        let cookie = info.netns_cookie;
        self.put_pod_info(id, *info)?;
        self.insert_rows(id, cookie, rows)?;
        self.pod_config
            .insert(cookie, *config, 0)
            .map_err(write_err(map::POD_CONFIG))?;
        Ok(())
    }

    /// Every pod's rows, by pod id, for `pods` (id, netns cookie): one read of each map, where
    /// [`Maps::pod_rows`] reads them whole once per pod.
    pub fn pods_rows(&self, pods: &[(u32, u64)]) -> std::collections::HashMap<u32, PodRows> {
        let mut out: std::collections::HashMap<u32, PodRows> = pods
            .iter()
            .map(|&(id, _)| (id, PodRows::default()))
            .collect();
        let by_cookie: std::collections::HashMap<u64, u32> =
            pods.iter().map(|&(id, cookie)| (cookie, id)).collect();
        for (k, rule) in dump(&self.pod_ports) {
            if let Some(rows) = out.get_mut(&k.pod_id) {
                rows.ports.push(PortRule {
                    port: k.port,
                    direction: k.direction,
                    rule,
                });
            }
        }
        for (trie, excluded) in [(&self.cidr_exclude, true), (&self.cidr_include, false)] {
            for k in trie.keys().filter_map(Result::ok) {
                if let Some(rows) = out.get_mut(&k.data().pod_id()) {
                    let range = k.data().to_range(k.prefix_len());
                    if excluded {
                        rows.excluded.push(range);
                    } else {
                        rows.included.push(range);
                    }
                }
            }
        }
        for (a, cookie) in dump(&self.pod_ips) {
            if let Some(rows) = by_cookie.get(&cookie).and_then(|id| out.get_mut(id)) {
                rows.addresses.push(addr::to_ip(a));
            }
        }
        for rows in out.values_mut() {
            rows.sort();
        }
        out
    }

    /// Puts a pod back as it was (`config` None: it had none), dropping what a failed update
    /// added first so every restored entry fits as it did. Best effort.
    pub fn restore_pod(
        &mut self,
        id: u32,
        info: &PodInfo,
        config: Option<&PodConfig>,
        rows: &PodRows,
    ) {
        let cookie = info.netns_cookie;
        self.drop_rows_except(id, cookie, rows);
        let _ = self.put_pod_info(id, *info);
        let _ = self.insert_rows(id, cookie, rows);
        match config {
            Some(config) => {
                let _ = self.pod_config.insert(cookie, config, 0);
            }
            None => {
                let _ = self.pod_config.remove(&cookie);
            }
        }
    }

    /// Removes a pod's datapath entries: the switch first, then its rows and listeners. The
    /// identity record stays until [`Maps::remove_pod_info`] (it names what else to clean).
    pub fn remove_pod_entries(&mut self, id: u32, netns_cookie: u64) {
        let _ = self.pod_config.remove(&netns_cookie);
        self.drop_rows_except(id, netns_cookie, &PodRows::default());
        let _ = self.pod_listener.remove(&id);
        let _ = self.pod_listener6.remove(&id);
    }

    fn insert_rows(&mut self, id: u32, cookie: u64, rows: &PodRows) -> Result<(), WriteError> {
        let written = self.write_rows(id, cookie, rows);
        match written {
            Ok(()) => self.note_rows(|t| {
                for r in &rows.ports {
                    t.add_port(id, *r);
                }
                for r in &rows.excluded {
                    t.add_range(id, true, *r);
                }
                for r in &rows.included {
                    t.add_range(id, false, *r);
                }
                for ip in &rows.addresses {
                    t.add_address(cookie, *ip);
                }
            }),
            Err(_) => self.forget_rows(),
        }
        written
    }

    fn write_rows(&mut self, id: u32, cookie: u64, rows: &PodRows) -> Result<(), WriteError> {
        for r in &rows.ports {
            self.pod_ports
                .insert(port_key(id, r), r.rule, 0)
                .map_err(write_err(map::POD_PORTS))?;
        }
        for (trie, ranges, name) in [
            (&mut self.cidr_exclude, &rows.excluded, map::CIDR_EXCLUDE),
            (&mut self.cidr_include, &rows.included, map::CIDR_INCLUDE),
        ] {
            for &(ip, prefix) in ranges {
                let (key, len) = CidrKey::range(id, ip, prefix);
                trie.insert(&LpmKey::new(len, key), 1, 0)
                    .map_err(write_err(name))?;
            }
        }
        for ip in &rows.addresses {
            self.pod_ips
                .insert(addr::from_ip(*ip), cookie, 0)
                .map_err(write_err(map::POD_IPS))?;
        }
        Ok(())
    }

    fn drop_rows_except(&mut self, id: u32, cookie: u64, keep: &PodRows) {
        // In a session the pod's rows are known: delete just the stale ones.
        let known = self.with_session(|s| {
            s.rows
                .get_or_insert_with(|| self.read_tables())
                .rows(id, cookie)
        });
        if let Some(have) = known {
            for r in have.ports.iter().filter(|r| {
                !keep
                    .ports
                    .iter()
                    .any(|k| (k.port, k.direction) == (r.port, r.direction))
            }) {
                let _ = self.pod_ports.remove(&port_key(id, r));
            }
            for (trie, have, keep) in [
                (&mut self.cidr_exclude, &have.excluded, &keep.excluded),
                (&mut self.cidr_include, &have.included, &keep.included),
            ] {
                // Compared as the trie keys them (`have` is canonical already).
                let keep: Vec<Range> = keep.iter().map(|r| canonical(*r)).collect();
                for &(ip, prefix) in have.iter().filter(|r| !keep.contains(r)) {
                    let (key, len) = CidrKey::range(id, ip, prefix);
                    let _ = trie.remove(&LpmKey::new(len, key));
                }
            }
            for ip in have
                .addresses
                .iter()
                .filter(|a| !keep.addresses.contains(a))
            {
                let _ = self.pod_ips.remove(&addr::from_ip(*ip));
            }
            self.note_rows(|t| t.retain(id, cookie, keep));
            return;
        }
        let ports: HashSet<PortKey> = keep.ports.iter().map(|r| port_key(id, r)).collect();
        let stale: Vec<PortKey> = dump(&self.pod_ports)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.pod_id == id && !ports.contains(k))
            .collect();
        for key in stale {
            let _ = self.pod_ports.remove(&key);
        }
        drop_ranges_except(&mut self.cidr_exclude, id, &keep.excluded);
        drop_ranges_except(&mut self.cidr_include, id, &keep.included);
        let addresses: HashSet<Addr> = keep.addresses.iter().map(|a| addr::from_ip(*a)).collect();
        let stale: Vec<Addr> = dump(&self.pod_ips)
            .into_iter()
            .filter(|(a, c)| *c == cookie && !addresses.contains(a))
            .map(|(a, _)| a)
            .collect();
        for a in stale {
            let _ = self.pod_ips.remove(&a);
        }
    }
}

/// Inbound listeners: the node-wide `LISTENERS` sockhash and each pod's recorded cookies.
impl Maps {
    /// Every pod's recorded listener of one family, by pod id (one batched read).
    pub fn pod_listeners(&self, family: ListenerFamily) -> std::collections::HashMap<u32, u64> {
        dump(self.listener_map(family)).into_iter().collect()
    }

    /// The cookie recorded as the pod's listener of this family.
    pub fn pod_listener(&self, id: u32, family: ListenerFamily) -> Option<u64> {
        self.listener_map(family).get(&id, 0).ok()
    }

    pub fn set_pod_listener(
        &mut self,
        id: u32,
        family: ListenerFamily,
        cookie: u64,
    ) -> Result<(), WriteError> {
        let name = match family {
            ListenerFamily::V4 => map::POD_LISTENER,
            ListenerFamily::V6 => map::POD_LISTENER6,
        };
        let map = match family {
            ListenerFamily::V4 => &mut self.pod_listener,
            ListenerFamily::V6 => &mut self.pod_listener6,
        };
        map.insert(id, cookie, 0).map_err(write_err(name))
    }

    pub fn forget_pod_listener(&mut self, id: u32, family: ListenerFamily) {
        let _ = match family {
            ListenerFamily::V4 => self.pod_listener.remove(&id),
            ListenerFamily::V6 => self.pod_listener6.remove(&id),
        };
    }

    /// Puts a listening socket (one the agent borrowed from its process) into `LISTENERS`.
    pub fn add_listener(&mut self, cookie: u64, socket: &impl AsRawFd) -> Result<(), WriteError> {
        self.listeners
            .insert(cookie, socket.as_raw_fd(), 0)
            .map_err(write_err(map::LISTENERS))?;
        self.with_session(|s| s.listeners.as_mut().map(|(l, _)| l.insert(cookie)));
        Ok(())
    }

    fn listener_map(&self, family: ListenerFamily) -> &HashMap<MapData, u32, u64> {
        match family {
            ListenerFamily::V4 => &self.pod_listener,
            ListenerFamily::V6 => &self.pod_listener6,
        }
    }
}

fn port_key(pod_id: u32, rule: &PortRule) -> PortKey {
    PortKey {
        pod_id,
        port: rule.port,
        direction: rule.direction,
    }
}

/// Every entry of a hash map: in batches where the kernel can (`sys::lookup_batch`), else
/// walked key by key.
pub(super) fn dump<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    let data = map.map();
    let capacity = data.info().map_or(1 << 16, |i| i.max_entries() as usize);
    super::sys::lookup_batch::<K, V>(data.fd().as_fd(), capacity)
        .unwrap_or_else(|_| map.iter().filter_map(Result::ok).collect())
}

fn ranges_of(trie: &LpmTrie<MapData, CidrKey, u32>, id: u32) -> Vec<Range> {
    let mut out: Vec<Range> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().pod_id() == id)
        .map(|k| k.data().to_range(k.prefix_len()))
        .collect();
    out.sort_unstable();
    out
}

fn drop_ranges_except(trie: &mut LpmTrie<MapData, CidrKey, u32>, id: u32, keep: &[Range]) {
    // A set, so a pod with many ranges costs one pass over the trie, not keys × ranges.
    let keep: HashSet<Range> = keep.iter().copied().collect();
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().pod_id() == id && !keep.contains(&k.data().to_range(k.prefix_len())))
        .collect();
    for key in stale {
        let _ = trie.remove(&key);
    }
}
