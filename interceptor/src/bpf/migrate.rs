//! ABI migration: a newer agent finds a datapath of an older ABI attached and moves it to its
//! own without a moment where pods are not intercepted. The per-map layouts and strategies are
//! written down in `interceptor_common::layout`; this module carries them out:
//!
//! 1. **Plan** — every map whose layout is the same in both ABIs is kept (the same kernel
//!    object, shared by the old and the new programs: nothing is copied, nothing written
//!    meanwhile is lost — this includes the original-destination maps, so a connection whose
//!    connect() ran under the old connect4 is answered by the new getsockopt). Every other map
//!    needs a converter (`Convert`), is written by the agent (`Rebuild`) or starts empty while
//!    the old one drains (`Drain`). If one cannot be carried over, the migration is refused
//!    before anything changes, with what to do.
//! 2. **Stage** — the kept maps are pinned a second time under `maps_next/`, the object is
//!    loaded against that directory (aya reuses pinned maps by name and creates the rest), and
//!    the new maps are filled.
//! 3. **Swap** — every program is replaced on its link (`bpf/upgrade.rs`: `BPF_LINK_UPDATE`
//!    on the cgroup links and each pod's sk_lookup link, sk_msg on the sockhash), even those
//!    whose code is unchanged: they reference the new maps.
//! 4. **Commit** — `maps_next/` takes the place of `maps/` (one `RENAME_EXCHANGE`), and the old
//!    pins go. The old maps live on only as long as something holds them: an established
//!    socket keeps the sk_msg program it joined the sockhash with, and that program its maps.
//!
//! If a step before the commit fails, the swapped programs are swapped back and `maps_next/` is
//! removed: the old datapath runs on unchanged.

use std::{fs, os::fd::AsFd as _, time::Duration};

use aya::maps::{MapData, PerCpuArray};
use interceptor_common::{
    ABI_VERSION, counters,
    layout::{self, MapLayout, Migration},
    names::map,
};
use tracing::{info, warn};

use super::{Error, Pins, maps::open_pinned, occupancy, sys, upgrade::Report};

/// Fills one new map from the old one; returns how many entries it carried over.
type Converter = fn(old: &Pins, new: &Pins) -> Result<usize, Error>;

/// What happens to one map.
enum Step {
    Keep,
    Convert(Converter),
    Rebuild,
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
    Ok(Plan { from: found, steps })
}

impl Plan {
    pub(super) fn from(&self) -> u32 {
        self.from
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
        Ok(staging)
    }

    /// Fills the new maps of `staging` from the old ones under `pins` (the object is loaded, so
    /// every map exists) and says what it did with each map in `report`. `Rebuild` maps are
    /// written by the caller (CONFIG from its options, ABI).
    pub(super) fn fill(
        &self,
        pins: &Pins,
        staging: &Pins,
        report: &mut Report,
    ) -> Result<(), Error> {
        report.migrated_from = Some(self.from);
        for (l, step) in &self.steps {
            let line = match step {
                Step::Keep => {
                    let entries = occupancy::map_use(staging, l.name)
                        .and_then(|u| u.entries)
                        .map_or_else(String::new, |n| format!(", {n} entries"));
                    format!("{} kept (same layout{entries})", l.name)
                }
                Step::Convert(convert) => {
                    let n = convert(pins, staging)?;
                    format!("{} converted ({n} entries)", l.name)
                }
                Step::Rebuild => format!("{} rebuilt", l.name),
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
}

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
        // `pod` command then fails and says so; the datapath is not affected).
        warn!(%err, "bpffs cannot exchange names; renaming in two steps");
        let old = pins.root().join("maps_old");
        let _ = fs::remove_dir_all(&old);
        fs::rename(&current, &old).map_err(|e| Error::io("renaming", &current, e))?;
        fs::rename(&next, &current).map_err(|e| Error::io("renaming", &next, e))?;
        fs::rename(&old, &next).map_err(|e| Error::io("renaming", &old, e))?;
    }
    // `next` now holds the old maps' pins.
    fs::remove_dir_all(&next).map_err(|e| Error::io("removing", &next, e))?;
    Ok(())
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

    #[cfg(feature = "abi-probe")]
    #[test]
    fn abi_7_converts_the_counters_and_keeps_the_rest() {
        let plan = plan(&Pins::new("/x"), 7).expect("plan");
        for (l, step) in &plan.steps {
            let expected = match l.name {
                map::COUNTERS => matches!(step, Step::Convert(_)),
                map::ABI => matches!(step, Step::Rebuild),
                _ => matches!(step, Step::Keep),
            };
            assert!(expected, "{}", l.name);
        }
    }
}
