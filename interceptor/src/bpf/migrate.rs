//! ABI migration: a newer agent finds a datapath of an older ABI attached and moves it to its
//! own without a moment where pods are not intercepted. The per-map layouts and strategies are
//! written down in `interceptor_common::layout`; this module carries them out:
//!
//! 1. **Plan** — every map whose layout is the same in both ABIs is kept (the same kernel
//!    object, shared by the old and the new programs: nothing is copied, nothing written
//!    meanwhile is lost — this includes the original-destination maps, so a connection whose
//!    connect() ran under the old connect4 is answered by the new getsockopt). Every other map
//!    needs a converter (`Convert`), is written by the agent (`Rebuild`), is rebuilt from the
//!    pod registry (`FromRegistry`) or starts empty while the old one drains (`Drain`). If one
//!    cannot be carried over, the migration is refused before anything changes, with what to do.
//! 2. **Stage** — the kept maps are pinned a second time under `maps_next/`, the object is
//!    loaded against that directory (aya reuses pinned maps by name and creates the rest), and
//!    the new maps are filled: converted maps copied (not the connection maps: see 3), the
//!    registry's pods written by the caller's rebuild (`registry::rebuild`, the code
//!    `pod enable` writes with).
//! 3. **Swap** — every program is replaced on its link (`bpf/upgrade.rs`: `BPF_LINK_UPDATE`
//!    on the cgroup links and each pod's sk_lookup link, sk_msg on the sockhash), even those
//!    whose code is unchanged: they reference the new maps. Old and new programs run side by
//!    side meanwhile: a converted connection map (`layout::CONNECTION_MAPS`) is also pinned
//!    under its `*_PREV` name before the object is loaded, so a new program that misses an
//!    entry looks in the old map, and its readers are swapped before its writers
//!    (`layout::SWAP_ORDER`): an entry is always where its reader looks — a connection whose
//!    connect() ran under the old connect4 is handled by the new sockops, and one accepted
//!    before the upgrade is answered by the new getsockopt. Only after the swap (no old writer
//!    runs any more) is the old map copied into the new one, so the next migration finds every
//!    entry here: a copy made before would keep the entries of connections that close before
//!    their writer is swapped (the old programs remove them from the old map only), and a new
//!    reader looks in its own map first — a reused 4-tuple would get a closed connection's
//!    original destination. A connection that closes during the copy is not carried over.
//! 4. **Commit** — `maps_next/` takes the place of `maps/` (one `RENAME_EXCHANGE`), and the old
//!    pins go. The old maps live on only as long as something holds them: an established
//!    socket keeps the sk_msg program it joined the sockhash with, and that program its maps.
//!
//! If a step before the commit fails, the swapped programs are swapped back and `maps_next/` is
//! removed: the old datapath runs on unchanged.

use std::{
    fs::{self, File},
    os::fd::AsFd as _,
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray},
    sys::SyscallError,
};
use interceptor_common::{
    ABI_VERSION, counters,
    dns::DnsOrig,
    layout::{self, MapLayout, Migration},
    names::map,
    origdst::OrigDst,
    sockmap::SockKey,
};
use tracing::{info, warn};

use super::{
    Error, Pins,
    maps::{dump, open_pinned},
    occupancy, sys,
    upgrade::Report,
};

/// Fills one new map from the old one; returns how many entries it carried over. A connection
/// map's (`layout::CONNECTION_MAPS`) runs only once the programs are swapped (`Plan::catch_up`),
/// every other one before the swap (`Plan::fill`).
type Converter = fn(old: &Pins, new: &Pins) -> Result<usize, Error>;

/// What happens to one map.
enum Step {
    Keep,
    Convert(Converter),
    Rebuild,
    FromRegistry,
    Drain,
}

/// The migration of one pinned datapath, decided before anything changes.
pub(super) struct Plan {
    from: u32,
    steps: Vec<(&'static MapLayout, Step)>,
}

/// The converter for `name`'s layout as ABI `from` had it, if one is written.
fn converter(name: &str, from: u32) -> Option<Converter> {
    match (name, from) {
        (map::COUNTERS, 6) => Some(convert_counters_v6),
        (map::COUNTERS, 7) => Some(convert_counters_v7),
        // ABIs 6 and 7 wrote the original destinations in this build's layout (7 added a flag
        // bit that 6's entries lack and mean nothing by): copied as they are.
        (map::COOKIE_ORIG, 6 | 7) => {
            Some(|old, new| copy::<u64, OrigDst>(old, new, map::COOKIE_ORIG))
        }
        (map::TUPLE_ORIG, 6 | 7) => {
            Some(|old, new| copy::<SockKey, OrigDst>(old, new, map::TUPLE_ORIG))
        }
        (map::DNS_ORIG, 6 | 7) => Some(|old, new| copy::<u64, DnsOrig>(old, new, map::DNS_ORIG)),
        _ => None,
    }
}

/// Decides how to migrate a datapath pinned by an agent of ABI `found`, or refuses.
pub(super) fn plan(pins: &Pins, found: u32) -> Result<Plan, Error> {
    let refuse = |why: String| Error::AbiNotMigratable {
        path: pins.root().to_owned(),
        found,
        expected: ABI_VERSION,
        why,
    };
    if found > ABI_VERSION {
        return Err(refuse(
            "it is newer than this binary (a downgrade); run the newer agent, or accept a gap"
                .into(),
        ));
    }
    if found < layout::MIGRATES_FROM {
        return Err(refuse(format!(
            "this binary migrates ABI {} and newer",
            layout::MIGRATES_FROM
        )));
    }
    let mut steps = Vec::new();
    for l in layout::MAPS {
        let step = if l.same_since(found) {
            Step::Keep
        } else {
            match l.migration {
                Migration::Convert => match converter(l.name, found) {
                    Some(c) => Step::Convert(c),
                    None => {
                        return Err(refuse(format!(
                            "no converter for map {} from ABI {found}",
                            l.name
                        )));
                    }
                },
                Migration::Rebuild => Step::Rebuild,
                Migration::FromRegistry => Step::FromRegistry,
                Migration::Drain => Step::Drain,
                Migration::Unsupported => {
                    return Err(refuse(format!(
                        "map {}'s layout changed and its contents cannot be carried over",
                        l.name
                    )));
                }
            }
        };
        steps.push((l, step));
    }
    unify_sockhash_group(&mut steps, |name| pins.map(name).exists());
    let ours = object_sizes();
    let old = |name: &str| {
        aya::maps::MapInfo::from_pin(pins.map(name))
            .ok()
            .map(|i| (i.key_size(), i.value_size()))
    };
    if let Some(why) = undecodable(found, &steps, old, |name| ours.get(name).copied()) {
        return Err(refuse(why));
    }
    Ok(Plan { from: found, steps })
}

/// `(map, old ABI)` pairs whose old entries this build decodes with that ABI's frozen types
/// although their key or value size differs from this build's (a build that changes a registry
/// or connection map's types adds its decoder and the pair here). None yet: ABIs 6 to 8 share
/// these types.
const DECODERS: &[(&str, u32)] = &[];

/// Why the old maps cannot be read, if they cannot: a map this migration reads or keeps whose
/// key or value size (`old`, from the pinned map; `ours`, from this build's object) differs
/// with no decoder for it. Read: the registry's maps (the rebuild reads old rows with this
/// build's types) and the converted maps; kept: the same object, so the same layout is
/// required. A layout declared unchanged in `layout::MAPS` but of another size is caught here
/// too. Maps either side lacks are skipped (new maps, a check-only build without an object).
fn undecodable(
    found: u32,
    steps: &[(&'static MapLayout, Step)],
    old: impl Fn(&str) -> Option<(u32, u32)>,
    ours: impl Fn(&str) -> Option<(u32, u32)>,
) -> Option<String> {
    let mut differ = Vec::new();
    for (l, step) in steps {
        let read = match step {
            Step::Keep | Step::Convert(_) | Step::FromRegistry => true,
            Step::Rebuild | Step::Drain => false,
        };
        if !read || l.name == map::COUNTERS || DECODERS.contains(&(l.name, found)) {
            // COUNTERS: its converters know each ABI's slots (a per-CPU u64 array either way).
            continue;
        }
        if let (Some(o), Some(n)) = (old(l.name), ours(l.name))
            && o != n
        {
            differ.push(format!(
                "{} (key/value {}/{} bytes, this build {}/{})",
                l.name, o.0, o.1, n.0, n.1
            ));
        }
    }
    (!differ.is_empty()).then(|| {
        format!(
            "the layout of {} differs and this build has no decoder for ABI {found}'s",
            differ.join(", ")
        )
    })
}

/// Key and value sizes of this build's maps, from the embedded object (none in a check-only
/// build).
fn object_sizes() -> std::collections::HashMap<String, (u32, u32)> {
    if super::OBJECT.is_empty() {
        return Default::default();
    }
    aya_obj::Object::parse(super::OBJECT)
        .map(|o| {
            o.maps
                .iter()
                .map(|(name, m)| (name.clone(), (m.key_size(), m.value_size())))
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps or drains the connection maps together (`layout::SOCKHASH_GROUP`): if one the old
/// ABI had is not kept, none is — the new programs then start on a new set and the old set
/// drains with the old sk_msg. `existed` says which maps the old ABI pinned.
fn unify_sockhash_group(steps: &mut [(&'static MapLayout, Step)], existed: impl Fn(&str) -> bool) {
    let in_group = |l: &MapLayout| layout::SOCKHASH_GROUP.contains(&l.name) && existed(l.name);
    let mixed = steps
        .iter()
        .any(|(l, step)| in_group(l) && !matches!(step, Step::Keep));
    if mixed {
        for (l, step) in steps.iter_mut() {
            if in_group(l) {
                *step = Step::Drain;
            }
        }
    }
}

impl Plan {
    pub(super) fn from(&self) -> u32 {
        self.from
    }

    /// Whether the map `name` is kept (the same kernel object as the old programs').
    pub(super) fn keeps(&self, name: &str) -> bool {
        self.steps
            .iter()
            .any(|(l, step)| l.name == name && matches!(step, Step::Keep))
    }

    /// Prepares `maps_next/`: empty, with every kept map pinned in it. Returns the staging pins.
    pub(super) fn stage(&self, pins: &Pins) -> Result<Pins, Error> {
        let staging = pins.staging();
        let dir = staging.maps_dir();
        // A migration that died before its commit left this; the datapath still runs on maps/.
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))?;
        }
        pins.create_private_dir(&dir)
            .map_err(|e| Error::io("creating", &dir, e))?;
        for (l, step) in &self.steps {
            let old = pins.map(l.name);
            if !matches!(step, Step::Keep) || !old.exists() {
                continue;
            }
            let fd = sys::obj_get(&old).map_err(|e| Error::io("opening", &old, e))?;
            let new = staging.map(l.name);
            sys::obj_pin(fd.as_fd(), &new).map_err(|e| Error::io("pinning", &new, e))?;
        }
        // The new programs' view of the old connection maps (see the module doc).
        for c in layout::CONNECTION_MAPS {
            let old = pins.map(c.name);
            if !self.converts(c.name) || !old.exists() {
                continue;
            }
            let fd = sys::obj_get(&old).map_err(|e| Error::io("opening", &old, e))?;
            let prev = staging.map(c.previous);
            sys::obj_pin(fd.as_fd(), &prev).map_err(|e| Error::io("pinning", &prev, e))?;
        }
        Ok(staging)
    }

    /// Whether a map of the pod registry is rebuilt (the caller's `rebuild` runs).
    pub(super) fn rebuilds_registry(&self) -> bool {
        self.steps
            .iter()
            .any(|(_, step)| matches!(step, Step::FromRegistry))
    }

    /// Fills the new maps of `staging` from the old ones under `pins` (the object is loaded, so
    /// every map exists) and says what it did with each map in `report`. `Rebuild` maps are
    /// written by the caller (CONFIG from its options, ABI); `FromRegistry` ones by `rebuild`,
    /// run once if any is (it writes every pod into the staged set, kept maps included: the
    /// same values there), which returns how many pods it wrote and the inbound pods whose
    /// listener it skipped (gone meanwhile).
    pub(super) fn fill(
        &self,
        pins: &Pins,
        staging: &Pins,
        report: &mut Report,
        rebuild: impl FnOnce() -> Result<(usize, Vec<String>), Error>,
    ) -> Result<(), Error> {
        report.migrated_from = Some(self.from);
        let pods = if self.rebuilds_registry() {
            Some(rebuild()?)
        } else {
            None
        };
        for (l, step) in &self.steps {
            let line = match step {
                Step::Keep => {
                    let entries = occupancy::map_use(staging, l.name)
                        .and_then(|u| u.entries)
                        .map_or_else(String::new, |n| format!(", {n} entries"));
                    format!("{} kept (same layout{entries})", l.name)
                }
                // A connection map is only copied after the swap (`catch_up`): a copy made
                // now would keep the entries of connections that close before their writer
                // is swapped (the old programs remove them from the old map only), and the
                // new readers look in their own map first — a reused 4-tuple would get the
                // closed connection's original destination.
                Step::Convert(_) if is_connection_map(l.name) => {
                    let prev = layout::CONNECTION_MAPS
                        .iter()
                        .find(|c| c.name == l.name)
                        .map_or("", |c| c.previous);
                    format!(
                        "{} new (the old one is read through {prev} until the swap is done)",
                        l.name
                    )
                }
                Step::Convert(convert) => {
                    let n = convert(pins, staging)?;
                    format!("{} converted ({n} entries)", l.name)
                }
                Step::Rebuild => format!("{} rebuilt", l.name),
                Step::FromRegistry => {
                    let (pods, skipped) = pods.as_ref().map_or((0, &[][..]), |(n, s)| (*n, &s[..]));
                    let skipped = if skipped.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; listeners of {} pods gone meanwhile not registered: {}",
                            skipped.len(),
                            skipped.join(", ")
                        )
                    };
                    format!(
                        "{} rebuilt from the pod registry ({pods} pods){skipped}",
                        l.name
                    )
                }
                Step::Drain if !pins.map(l.name).exists() => {
                    format!("{} new (empty; ABI {} had none)", l.name, self.from)
                }
                Step::Drain => format!(
                    "{} new (the old one serves the connections already in it until they close)",
                    l.name
                ),
            };
            report.maps.push(line);
        }
        Ok(())
    }

    fn converts(&self, name: &str) -> bool {
        self.steps
            .iter()
            .any(|(l, step)| l.name == name && matches!(step, Step::Convert(_)))
    }

    /// Copies each converted connection map, once every program is swapped (no old writer
    /// runs): what the old programs wrote, read meanwhile through the `*_PREV` maps, joins the
    /// new map and leaves the old one ([`carry_over`]: less the connections that close
    /// meanwhile). A failure is
    /// reported, not fatal: the entries stay readable through `*_PREV` until the next migration.
    pub(super) fn catch_up(&self, pins: &Pins, staging: &Pins, report: &mut Report) {
        for c in layout::CONNECTION_MAPS {
            let convert = self.steps.iter().find_map(|(l, step)| match step {
                Step::Convert(convert) if l.name == c.name => Some(*convert),
                _ => None,
            });
            let Some(convert) = convert else { continue };
            let line = match convert(pins, staging) {
                Ok(n) => format!(
                    "{} carried over after the swap ({n} entries the old programs wrote)",
                    c.name
                ),
                Err(err) => {
                    warn!(map = c.name, %err, "copying the connection map after the swap failed");
                    format!(
                        "{} not carried over ({err}); its old entries are read through {}",
                        c.name, c.previous
                    )
                }
            };
            report.maps.push(line);
        }
    }
}

/// Whether `name` is a connection-owned map (`layout::CONNECTION_MAPS`).
fn is_connection_map(name: &str) -> bool {
    layout::CONNECTION_MAPS.iter().any(|c| c.name == name)
}

/// A connection map of a layout this build shares, old to new, entry by entry, once every
/// program is swapped (`catch_up`; no old writer runs any more). See [`carry_over`].
fn copy<K: aya::Pod, V: aya::Pod>(
    old: &Pins,
    new: &Pins,
    name: &'static str,
) -> Result<usize, Error> {
    let mut from: HashMap<MapData, K, V> = open_pinned(old, name)?;
    let mut to: HashMap<MapData, K, V> = open_pinned(new, name)?;
    let entries = dump(&from);
    carry_over(&mut from, &mut to, entries).map_err(|source| Error::Map { map: name, source })
}

/// The two maps of a catch-up as [`carry_over`] uses them (a trait so its handling of
/// connections that close meanwhile is tested without a kernel).
trait Entries<K, V> {
    fn has(&self, key: &K) -> Result<bool, MapError>;
    /// Inserts where `key` is absent; false if it was present.
    fn insert_absent(&mut self, key: &K, value: &V) -> Result<bool, MapError>;
    fn delete(&mut self, key: &K) -> Result<(), MapError>;
}

impl<K: aya::Pod, V: aya::Pod> Entries<K, V> for HashMap<MapData, K, V> {
    fn has(&self, key: &K) -> Result<bool, MapError> {
        match self.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn insert_absent(&mut self, key: &K, value: &V) -> Result<bool, MapError> {
        match self.insert(key, value, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn delete(&mut self, key: &K) -> Result<(), MapError> {
        match self.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

/// Moves `entries` (listed from `from`, the old map) into `to`, the new one; returns how many
/// it inserted. An entry already in `to` was written by a new program since: the newer one, it
/// stays. A connection can close between the listing and the insert (the new programs then
/// removed its entry from both maps, and the insert would bring it back, stale, for a later
/// connection of the same 4-tuple): after each insert the key is looked up in `from` again,
/// and if it is gone the insert is undone. Each key handled is then deleted from `from` (the
/// new programs' `*_PREV` map): the new map holds it, or a newer entry, and a later miss of a
/// new program in its own map must not find a stale one there (an entry nothing removes, e.g.
/// under a key whose connection closed without the removal finding it). Race-free because every program is swapped: no old writer adds to `from`, and a close
/// after the re-check removes the entry from `to` itself.
fn carry_over<K, V>(
    from: &mut impl Entries<K, V>,
    to: &mut impl Entries<K, V>,
    entries: Vec<(K, V)>,
) -> Result<usize, MapError> {
    let mut copied = 0;
    for (k, v) in entries {
        if to.insert_absent(&k, &v)? {
            if from.has(&k)? {
                copied += 1;
            } else {
                // Closed meanwhile.
                to.delete(&k)?;
                continue;
            }
        }
        from.delete(&k)?;
    }
    Ok(copied)
}

/// `BPF_NOEXIST`: insert only where the key is absent.
const BPF_NOEXIST: u64 = 1;

fn convert_counters_v6(old: &Pins, new: &Pins) -> Result<usize, Error> {
    convert_counters(old, new, counters::ABI6_SLOTS)
}

fn convert_counters_v7(old: &Pins, new: &Pins) -> Result<usize, Error> {
    convert_counters(old, new, counters::ABI7_SLOTS)
}

/// `COUNTERS` of an older ABI (`slots`: its frozen layout) into this build's slots, by name.
/// Runs before the swap, so no program writes the new map meanwhile; what the old programs
/// count between this copy and the swap (a few milliseconds) stays in the old map.
fn convert_counters(old: &Pins, new: &Pins, slots: &[&str]) -> Result<usize, Error> {
    let err = |source| Error::Map {
        map: map::COUNTERS,
        source,
    };
    let from: PerCpuArray<MapData, u64> = open_pinned(old, map::COUNTERS)?;
    let mut to: PerCpuArray<MapData, u64> = open_pinned(new, map::COUNTERS)?;
    let mut carried = 0;
    for (i, name) in slots.iter().enumerate() {
        let Some(slot) = counters::slot_of(name) else {
            continue;
        };
        // One value per possible CPU in both maps: copied as they are.
        let values = from.get(&(i as u32), 0).map_err(err)?;
        to.set(slot, values, 0).map_err(err)?;
        carried += 1;
    }
    Ok(carried)
}

/// Puts `maps_next/` in the place of `maps/` and removes the old pins. The programs already
/// run on the new maps: this only moves names, so `pod`, `status` and the next agent find them.
pub(super) fn commit(pins: &Pins, staging: &Pins) -> Result<(), Error> {
    let (current, next) = (pins.maps_dir(), staging.maps_dir());
    let exchanged = nix::fcntl::renameat2(
        None,
        &next,
        None,
        &current,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    );
    if let Err(err) = exchanged {
        // A kernel whose bpffs cannot exchange: two renames, `maps/` missing for a moment (a
        // `pod` command then fails and says so; the datapath is not affected). An agent that
        // dies between them is finished by the next one ([`recover`]).
        warn!(%err, "bpffs cannot exchange names; renaming in two steps");
        let old = old_dir(pins);
        let _ = fs::remove_dir_all(&old);
        fs::rename(&current, &old).map_err(|e| Error::io("renaming", &current, e))?;
        if let Err(e) = fs::rename(&next, &current) {
            // Put the old names back: `maps/` must not stay missing.
            if let Err(back) = fs::rename(&old, &current) {
                warn!(%back, "could not rename maps_old back to maps; the next agent restores it");
            }
            return Err(Error::io("renaming", &next, e));
        }
        fs::remove_dir_all(&old).map_err(|e| Error::io("removing", &old, e))?;
        return Ok(());
    }
    // `next` now holds the old maps' pins.
    fs::remove_dir_all(&next).map_err(|e| Error::io("removing", &next, e))?;
    Ok(())
}

fn old_dir(pins: &Pins) -> std::path::PathBuf {
    pins.root().join("maps_old")
}

/// Finishes or undoes a commit that stopped between its two renames (an agent killed there, or
/// a failed rename): with `maps/` missing, `maps_next/` is the set the programs run on (the
/// swap came before the commit), so it becomes `maps/`; with only `maps_old/`, that is put
/// back. Then a `maps_old/` beside `maps/` is the old set: removed.
pub(super) fn recover(pins: &Pins) -> Result<(), Error> {
    let (current, next, old) = (pins.maps_dir(), pins.staging().maps_dir(), old_dir(pins));
    if !current.exists() {
        for from in [&next, &old] {
            if from.is_dir() {
                warn!(from = %from.display(), "maps/ is missing after an interrupted migration; restoring it");
                fs::rename(from, &current).map_err(|e| Error::io("renaming", from, e))?;
                break;
            }
        }
    }
    if current.exists() && old.exists() {
        fs::remove_dir_all(&old).map_err(|e| Error::io("removing", &old, e))?;
    }
    Ok(())
}

/// With the pinned ABI this build's: a `maps_next/` or `maps_old/` is left from a migration
/// that died (before its commit, or after it) and pins maps nothing uses any more.
pub(super) fn remove_leftovers(pins: &Pins) {
    for dir in [pins.staging().maps_dir(), old_dir(pins)] {
        if dir.exists() {
            info!(dir = %dir.display(), "removing what an interrupted migration left");
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Takes the pod registry's lock (`Registry::lock`'s), held from staging through commit.
pub(super) fn lock_pods(pins: &Pins) -> Result<Flock<File>, Error> {
    let dir = pins.run_dir();
    fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    let path = dir.join("pods.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("opening", &path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("locking", &path, e.into()))
}

/// Removes a staging directory after a failed migration (best effort).
pub(super) fn abandon(staging: &Pins) {
    let _ = fs::remove_dir_all(staging.maps_dir());
}

/// Logs the outcome.
pub(super) fn log(report: &Report, took: Duration) {
    info!(
        from = report.migrated_from,
        to = ABI_VERSION,
        maps = ?report.maps,
        micros = took.as_micros() as u64,
        "migrated the attached datapath to this ABI"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(found: u32) -> String {
        match plan(&Pins::new("/sys/fs/bpf/icpt-x"), found) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("ABI {found} planned"),
        }
    }

    #[test]
    fn refuses_a_downgrade_and_unknown_old_abis_saying_what_to_do() {
        let newer = refused(ABI_VERSION + 1);
        assert!(newer.contains("downgrade"), "{newer}");
        assert!(newer.contains("interceptor uninstall"), "{newer}");
        let old = refused(layout::MIGRATES_FROM - 1);
        assert!(old.contains("migrates ABI"), "{old}");
    }

    #[test]
    fn the_connection_maps_are_kept_or_drained_together() {
        let step = |name| {
            let l = layout::of(name).expect("layout");
            let step = if name == map::PEER_SEQ {
                Step::Drain
            } else {
                Step::Keep
            };
            (l, step)
        };
        let mut steps = vec![
            step(map::SOCKS),
            step(map::MSG_FALLBACK),
            step(map::PEER_SEQ),
            step(map::CONN_MSGS),
            step(map::POD_CONFIG),
        ];
        // CONN_MSGS did not exist in the old ABI: not part of the old set.
        unify_sockhash_group(&mut steps, |name| name != map::CONN_MSGS);
        let drained: Vec<&str> = steps
            .iter()
            .filter(|(_, s)| matches!(s, Step::Drain))
            .map(|(l, _)| l.name)
            .collect();
        assert_eq!(drained, [map::SOCKS, map::MSG_FALLBACK, map::PEER_SEQ]);
        // All kept: nothing changes.
        let mut kept = vec![step(map::SOCKS), step(map::MSG_FALLBACK)];
        unify_sockhash_group(&mut kept, |_| true);
        assert!(kept.iter().all(|(_, s)| matches!(s, Step::Keep)));
    }

    /// A scratch root (plain files stand in for pins: only names move).
    fn scratch(name: &str, dirs: &[&str]) -> Pins {
        let root = std::env::temp_dir().join(format!("icpt-mig-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in dirs {
            fs::create_dir_all(root.join(d)).expect("mkdir");
            fs::write(root.join(d).join("WHICH"), d).expect("write");
        }
        Pins::new(root)
    }

    fn which(pins: &Pins) -> Option<String> {
        fs::read_to_string(pins.maps_dir().join("WHICH")).ok()
    }

    /// Killed between the two renames: maps/ is gone, the programs run on maps_next/'s maps.
    #[test]
    fn an_interrupted_two_step_commit_is_finished_at_start() {
        let pins = scratch("finish", &["maps_old", "maps_next"]);
        recover(&pins).expect("recover");
        assert_eq!(which(&pins).as_deref(), Some("maps_next"));
        assert!(!pins.root().join("maps_old").exists());
        assert!(!pins.staging().maps_dir().exists());
        let _ = fs::remove_dir_all(pins.root());
    }

    /// The second rename failed and so did renaming back: the old set is restored.
    #[test]
    fn a_lone_maps_old_is_put_back() {
        let pins = scratch("restore", &["maps_old"]);
        recover(&pins).expect("recover");
        assert_eq!(which(&pins).as_deref(), Some("maps_old"));
        assert!(!pins.root().join("maps_old").exists());
        let _ = fs::remove_dir_all(pins.root());
    }

    #[test]
    fn an_intact_maps_dir_is_left_alone_and_leftovers_go_once_the_abi_is_ours() {
        let pins = scratch("intact", &["maps", "maps_next"]);
        recover(&pins).expect("recover");
        assert_eq!(which(&pins).as_deref(), Some("maps"));
        // maps_next/ may be a migration about to be retried: only removed by the caller
        // once the pinned ABI is this build's.
        assert!(pins.staging().maps_dir().exists());
        remove_leftovers(&pins);
        assert!(!pins.staging().maps_dir().exists());
        assert_eq!(which(&pins).as_deref(), Some("maps"));
        let _ = fs::remove_dir_all(pins.root());
    }

    #[test]
    fn commit_puts_the_staged_set_in_place() {
        let pins = scratch("commit", &["maps", "maps_next"]);
        commit(&pins, &pins.staging()).expect("commit");
        assert_eq!(which(&pins).as_deref(), Some("maps_next"));
        assert!(!pins.staging().maps_dir().exists());
        assert!(!pins.root().join("maps_old").exists());
        let _ = fs::remove_dir_all(pins.root());
    }

    /// Nothing of one ABI's layout differs from itself (the in-place upgrade's case).
    #[test]
    fn the_same_abi_keeps_every_map() {
        let plan = plan(&Pins::new("/x"), ABI_VERSION).expect("plan");
        assert_eq!(plan.steps.len(), map::PINNED.len());
        for (l, step) in &plan.steps {
            assert!(matches!(step, Step::Keep), "{}", l.name);
        }
    }

    /// The path users take: a release ABI 6 datapath under this release (ABI 7) agent.
    #[cfg(not(feature = "abi-probe"))]
    #[test]
    fn abi_6_converts_the_counters_creates_the_history_maps_and_keeps_the_rest() {
        let plan = plan(&Pins::new("/x"), 6).expect("plan");
        for (l, step) in &plan.steps {
            let expected = match l.name {
                map::COUNTERS => matches!(step, Step::Convert(_)),
                map::ABI => matches!(step, Step::Rebuild),
                map::MSG_HISTORY | map::CONN_MSGS => matches!(step, Step::Drain),
                _ => matches!(step, Step::Keep),
            };
            assert!(expected, "{}", l.name);
        }
    }

    /// The probe build (ABI 8) declares every registry map and every connection map changed:
    /// the e2e migration test runs every path against fresh maps.
    #[cfg(feature = "abi-probe")]
    #[test]
    fn abi_7_rebuilds_the_registry_converts_the_connections_and_keeps_the_rest() {
        let plan = plan(&Pins::new("/x"), 7).expect("plan");
        assert!(plan.rebuilds_registry());
        for (l, step) in &plan.steps {
            let expected = match l.name {
                map::COUNTERS | map::COOKIE_ORIG | map::TUPLE_ORIG | map::DNS_ORIG => {
                    matches!(step, Step::Convert(_))
                }
                map::POD_CONFIG
                | map::POD_IPS
                | map::POD_PORTS
                | map::CIDR_EXCLUDE
                | map::CIDR_INCLUDE
                | map::POD_INFO
                | map::POD_LISTENER
                | map::POD_LISTENER6
                | map::LISTENERS => matches!(step, Step::FromRegistry),
                map::ABI => matches!(step, Step::Rebuild),
                _ => matches!(step, Step::Keep),
            };
            assert!(expected, "{}", l.name);
        }
    }

    /// Whatever a later build changes, a map that converts has its converter from every ABI
    /// this build migrates from, and a registry map is rebuilt: no layout change is refused.
    #[test]
    fn every_map_is_carried_over_from_every_older_abi() {
        for from in layout::MIGRATES_FROM..ABI_VERSION {
            for l in layout::MAPS {
                match l.migration {
                    Migration::Convert => assert!(
                        converter(l.name, from).is_some(),
                        "no converter for {} from ABI {from}",
                        l.name
                    ),
                    Migration::Unsupported => panic!("{} cannot be carried over", l.name),
                    Migration::Rebuild | Migration::FromRegistry | Migration::Drain => {}
                }
            }
        }
    }

    static COPIES: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());

    fn fake_cookie(_: &Pins, _: &Pins) -> Result<usize, Error> {
        COPIES.lock().expect("lock").push(map::COOKIE_ORIG);
        Ok(1)
    }

    fn fake_tuple(_: &Pins, _: &Pins) -> Result<usize, Error> {
        COPIES.lock().expect("lock").push(map::TUPLE_ORIG);
        Err(Error::NoObject)
    }

    /// After the swap every converted connection map is copied; a kept one is
    /// not, and a failed copy is reported without failing the migration.
    #[test]
    fn converted_connection_maps_catch_up_after_the_swap() {
        let l = |name| layout::of(name).expect("layout");
        let plan = Plan {
            from: 7,
            steps: vec![
                (l(map::COOKIE_ORIG), Step::Convert(fake_cookie)),
                (l(map::TUPLE_ORIG), Step::Convert(fake_tuple)),
                (l(map::DNS_ORIG), Step::Keep),
                (l(map::COUNTERS), Step::Convert(fake_cookie)),
            ],
        };
        let pins = Pins::new("/x");
        let mut report = Report::default();
        plan.catch_up(&pins, &pins.staging(), &mut report);
        assert_eq!(
            *COPIES.lock().expect("lock"),
            [map::COOKIE_ORIG, map::TUPLE_ORIG]
        );
        assert_eq!(report.maps.len(), 2, "{:?}", report.maps);
        assert!(report.maps[0].starts_with("COOKIE_ORIG carried over after the swap (1 entries"));
        assert!(
            report.maps[1].starts_with("TUPLE_ORIG not carried over")
                && report.maps[1].contains("TUPLE_PREV"),
            "{:?}",
            report.maps
        );
    }

    static FILLED: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());

    fn fake_fill_cookie(_: &Pins, _: &Pins) -> Result<usize, Error> {
        FILLED.lock().expect("lock").push(map::COOKIE_ORIG);
        Ok(1)
    }

    fn fake_fill_counters(_: &Pins, _: &Pins) -> Result<usize, Error> {
        FILLED.lock().expect("lock").push(map::COUNTERS);
        Ok(1)
    }

    /// Before the swap only the counters are converted: a connection map copied then would
    /// keep entries of connections the old programs close before their writers are swapped.
    #[test]
    fn connection_maps_are_not_copied_before_the_swap() {
        let l = |name| layout::of(name).expect("layout");
        let plan = Plan {
            from: 7,
            steps: vec![
                (l(map::COOKIE_ORIG), Step::Convert(fake_fill_cookie)),
                (l(map::COUNTERS), Step::Convert(fake_fill_counters)),
            ],
        };
        let pins = Pins::new("/x");
        let mut report = Report::default();
        plan.fill(&pins, &pins.staging(), &mut report, || Ok((0, Vec::new())))
            .expect("fill");
        assert_eq!(*FILLED.lock().expect("lock"), [map::COUNTERS]);
        assert!(
            report.maps[0].starts_with("COOKIE_ORIG new") && report.maps[0].contains("COOKIE_PREV"),
            "{:?}",
            report.maps
        );
    }

    /// A map in memory.
    #[derive(Default)]
    struct Fake {
        entries: std::collections::BTreeMap<u32, u32>,
    }

    impl Entries<u32, u32> for Fake {
        fn has(&self, key: &u32) -> Result<bool, MapError> {
            Ok(self.entries.contains_key(key))
        }
        fn insert_absent(&mut self, key: &u32, value: &u32) -> Result<bool, MapError> {
            if self.entries.contains_key(key) {
                return Ok(false);
            }
            self.entries.insert(*key, *value);
            Ok(true)
        }
        fn delete(&mut self, key: &u32) -> Result<(), MapError> {
            self.entries.remove(key);
            Ok(())
        }
    }

    /// A connection listed in the old map that closes before its entry is inserted in the new
    /// one (the close removed it from both) does not come back in the new map; an entry a
    /// new program wrote since is the newer one and stays.
    #[test]
    fn a_connection_closed_during_the_catch_up_is_not_carried_over() {
        let mut old = Fake::default();
        old.entries.extend([(1, 10), (3, 30)]);
        let mut new = Fake::default();
        new.entries.insert(3, 33);
        // Listed with 2, which closed before the insert (gone from the old map).
        let listed = vec![(1, 10), (2, 20), (3, 30)];
        let copied = carry_over(&mut old, &mut new, listed).expect("carry over");
        assert_eq!(copied, 1);
        assert_eq!(new.entries.get(&1), Some(&10));
        assert_eq!(
            new.entries.get(&2),
            None,
            "a closed connection's entry came back"
        );
        assert_eq!(new.entries.get(&3), Some(&33));
    }

    /// Once carried over (or superseded by a new program's entry), an entry leaves the old
    /// map: a new program's later miss does not find it through `*_PREV`.
    #[test]
    fn the_old_map_is_emptied_of_what_was_carried_over() {
        let mut old = Fake::default();
        old.entries.extend([(1, 10), (3, 30), (4, 40)]);
        let mut new = Fake::default();
        new.entries.insert(3, 33);
        let listed = vec![(1, 10), (3, 30)];
        carry_over(&mut old, &mut new, listed).expect("carry over");
        // 4 was not listed (written after the listing by no one but a test): left alone.
        assert_eq!(old.entries.keys().copied().collect::<Vec<_>>(), [4]);
    }

    /// A map whose key or value size changed with no decoder is refused before anything
    /// changes (the rebuild would read the old rows with this build's types); the same sizes,
    /// or a map the old ABI lacks, pass.
    #[test]
    fn a_map_of_another_size_without_a_decoder_is_refused() {
        let l = |name| layout::of(name).expect("layout");
        let steps = vec![
            (l(map::POD_CONFIG), Step::FromRegistry),
            (l(map::POD_INFO), Step::Keep),
            (l(map::TUPLE_ORIG), Step::Convert(fake_fill_cookie)),
            (l(map::MSG_HISTORY), Step::Drain),
        ];
        let ours = |_: &str| Some((8, 32));
        let same = |_: &str| Some((8, 32));
        assert_eq!(undecodable(7, &steps, same, ours), None);
        let bigger = |name: &str| match name {
            map::POD_INFO => Some((4, 64)),
            map::MSG_HISTORY => Some((1, 1)),
            map::TUPLE_ORIG => None,
            _ => Some((8, 32)),
        };
        let why = undecodable(7, &steps, bigger, ours).expect("refused");
        assert!(
            why.contains("POD_INFO (key/value 4/64 bytes, this build 8/32)"),
            "{why}"
        );
        assert!(!why.contains("MSG_HISTORY"), "{why}");
        assert!(!why.contains("TUPLE_ORIG"), "{why}");
    }

    /// The sizes `plan` compares come from the embedded object (a check-only build has none).
    #[test]
    fn this_builds_sizes_are_read_from_the_object() {
        if super::super::OBJECT.is_empty() {
            return;
        }
        let sizes = object_sizes();
        for name in map::PINNED {
            assert!(sizes.contains_key(*name), "{name}: {sizes:?}");
        }
    }

    /// An inbound pod the rebuild skipped (gone meanwhile) is named in the report.
    #[test]
    fn the_report_names_the_pods_whose_listener_the_rebuild_skipped() {
        let plan = Plan {
            from: 7,
            steps: vec![(
                layout::of(map::POD_LISTENER).expect("layout"),
                Step::FromRegistry,
            )],
        };
        let pins = Pins::new("/x");
        let mut report = Report::default();
        plan.fill(&pins, &pins.staging(), &mut report, || {
            Ok((4, vec!["gone-pod".to_owned()]))
        })
        .expect("fill");
        assert_eq!(
            report.maps,
            [
                "POD_LISTENER rebuilt from the pod registry (4 pods); listeners of 1 pods gone \
              meanwhile not registered: gone-pod"
            ]
        );
    }
}
