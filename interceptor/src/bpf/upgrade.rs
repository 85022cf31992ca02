//! Upgrade in place: a newer agent finds a datapath of its own ABI pinned and attached, loads its
//! object against the pinned maps (so established connections keep their sockhash entries and
//! original destinations), and swaps in every program whose code differs — atomically, on the
//! pinned links (`BPF_LINK_UPDATE`, Linux >= 5.7), the sockhash's sk_msg slot (one exchange) and
//! every pod's sk_lookup link. Programs whose tag is unchanged stay as they are. If one swap
//! fails, those already done are swapped back, so the node runs one consistent family.
//!
//! What this agent asks for but cannot apply to the attached datapath is listed in the
//! [`Report`], which `interceptor status` shows: never ignored silently.

use std::{
    fs,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf,
    programs::{Program, ProgramError, ProgramInfo},
};
use interceptor_common::{layout, names};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Error, Pins, sys};

/// How the running agent got its datapath, and what of its settings the datapath does not run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `loaded`, `upgraded`, `migrated` (from an older ABI) or `adopted`.
    pub how: String,
    /// The ABI of the datapath this agent migrated (`how` = `migrated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_from: Option<u32>,
    /// What a migration did with each pinned map: kept (with its entries), converted (entries
    /// carried over), rebuilt, or new beside the old one that drains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<String>,
    /// Programs swapped for this agent's build: `name old-tag -> new-tag`.
    pub replaced: Vec<String>,
    /// Programs whose code (tag) this agent's build shares: left attached as they were.
    pub unchanged: Vec<String>,
    /// Settings and code this agent asked for that the attached datapath does not run, each
    /// with what to do about it.
    pub not_applied: Vec<String>,
    /// Time from loading the object to the last swap (a migration: from staging the maps to
    /// their commit), in microseconds.
    pub micros: u64,
    /// Of `micros`: from the first program swap to the last (the rest is loading and
    /// verifying the programs, and in a migration staging and filling the maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_micros: Option<u64>,
    /// The programs' log level this agent loaded with (aya-log; compared by the next agent).
    pub bpf_log_level: u8,
}

impl Report {
    pub(super) fn new(how: &str, bpf_log_level: u8) -> Self {
        Self {
            how: how.to_owned(),
            bpf_log_level,
            ..Self::default()
        }
    }

    fn path(pins: &Pins) -> PathBuf {
        pins.run_dir().join("datapath.json")
    }

    /// Records the report for `interceptor status` (best effort: status then shows none).
    pub(super) fn record(&self, pins: &Pins) {
        let path = Self::path(pins);
        let written = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .and_then(|json| fs::write(&path, json));
        if let Err(err) = written {
            warn!(path = %path.display(), %err, "could not record the datapath report for status");
        }
    }

    /// The running agent's report, if one was recorded.
    pub fn of_instance(pins: &Pins) -> Option<Self> {
        serde_json::from_slice(&fs::read(Self::path(pins)).ok()?).ok()
    }
}

/// One swap already made, with what undoes it.
enum Done {
    Link {
        link: OwnedFd,
        old: OwnedFd,
        new: OwnedFd,
    },
    SockHash {
        map: OwnedFd,
        old: OwnedFd,
    },
}

/// Swaps the attached programs for `ebpf`'s (loaded against the maps pinned under `pins`) where
/// their code differs, or every one with `all` (an ABI migration: the new programs use other
/// maps, which the tag does not show), in `layout::SWAP_ORDER`. On error nothing is left
/// swapped.
pub(super) fn swap_programs(
    ebpf: &mut Ebpf,
    pins: &Pins,
    cgroup: &Path,
    report: &mut Report,
    all: bool,
) -> Result<(), Error> {
    let start = Instant::now();
    let mut changed = Vec::new();
    for name in names::prog::ALL {
        let old_path = pins.prog(name);
        if !old_path.exists() {
            // The attached family never had it (this kernel lacks the hook): nothing to swap.
            continue;
        }
        let old = ProgramInfo::from_pin(&old_path).map_err(|source| program_err(name, source))?;
        let p = ebpf
            .program_mut(name)
            .ok_or_else(|| program_err(name, ProgramError::UnexpectedProgramType))?;
        load(p).map_err(|source| program_err(name, source))?;
        let new = p.info().map_err(|source| program_err(name, source))?;
        if new.tag() == old.tag() && !all {
            report.unchanged.push(name.to_owned());
            // Only loaded to learn its tag: the attached one stays.
            unload(p).map_err(|source| program_err(name, source))?;
        } else {
            changed.push((name, old.tag(), new.tag()));
        }
    }

    // sk_msg first, then the readers of each connection map before its writers (see there).
    changed.sort_by_key(|&(name, ..)| layout::SWAP_ORDER.iter().position(|p| *p == name));
    let mut done = Vec::new();
    let swapping = Instant::now();
    for &(name, old_tag, new_tag) in &changed {
        if let Err(err) = swap(ebpf, pins, name, &mut done) {
            warn!(program = name, %err, "swapping in the new program failed; rolling back");
            rollback(done);
            return Err(err);
        }
        report
            .replaced
            .push(format!("{name} {old_tag:016x} -> {new_tag:016x}"));
        stop_here_if_asked(done.len());
    }
    // From here on the new programs run; their pins follow so `pod enable` attaches the new
    // sk_lookup and status shows what runs.
    for &(name, ..) in &changed {
        repin(ebpf, pins, name);
    }
    report.micros = start.elapsed().as_micros() as u64;
    report.swap_micros = Some(swapping.elapsed().as_micros() as u64);
    check_cgroup(pins, cgroup, report);
    info!(
        replaced = ?report.replaced,
        unchanged = report.unchanged.len(),
        micros = report.micros,
        swap_micros = report.swap_micros,
        "swapped the attached programs for this build's"
    );
    Ok(())
}

/// Test hook of the `abi-probe` build only: with `INTERCEPTOR_TEST_EXIT_AFTER_FIRST_SWAP` set,
/// the process exits (status 3) right after its first program swap, as an agent killed
/// mid-swap would, so the e2e tests can check that the next agent finishes the job.
#[cfg(feature = "abi-probe")]
fn stop_here_if_asked(swapped: usize) {
    if swapped == 1 && std::env::var_os("INTERCEPTOR_TEST_EXIT_AFTER_FIRST_SWAP").is_some() {
        warn!("INTERCEPTOR_TEST_EXIT_AFTER_FIRST_SWAP: exiting after the first swap");
        std::process::exit(3);
    }
}

#[cfg(not(feature = "abi-probe"))]
fn stop_here_if_asked(_swapped: usize) {}

fn swap(ebpf: &Ebpf, pins: &Pins, name: &'static str, done: &mut Vec<Done>) -> Result<(), Error> {
    let new = ebpf
        .program(name)
        .ok_or_else(|| program_err(name, ProgramError::UnexpectedProgramType))?
        .fd()
        .map_err(|source| program_err(name, source))?
        .as_fd();
    let old_path = pins.prog(name);
    let old = sys::obj_get(&old_path).map_err(|e| Error::io("opening", &old_path, e))?;
    match name {
        names::prog::SK_MSG => {
            let path = pins.map(names::map::SOCKS);
            let map = sys::obj_get(&path).map_err(|e| Error::io("opening", &path, e))?;
            sys::prog_attach_map(new, map.as_fd(), sys::BPF_SK_MSG_VERDICT)
                .map_err(|e| Error::io("attaching the new sk_msg to", &path, e))?;
            done.push(Done::SockHash { map, old });
        }
        names::prog::SK_LOOKUP => {
            for path in pod_links(pins) {
                match update_link(&path, new, old.as_fd(), done) {
                    Err(Error::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ENOLINK) =>
                    {
                        // The pod's network namespace is gone (deleted while no agent ran):
                        // the link is detached and nothing runs on it. Its pin is dropped
                        // like the agent's reconcile drops a dead pod's.
                        warn!(link = %path.display(), "pod's sk_lookup link is detached (its network namespace is gone); dropping its pin");
                        let _ = fs::remove_file(&path);
                    }
                    other => other?,
                }
            }
        }
        _ => update_link(&pins.link(name), new, old.as_fd(), done)?,
    }
    Ok(())
}

/// Swaps `new` in on the pinned link at `path`. The expected old program (`BPF_F_REPLACE`) is
/// the one the link runs (by its id in the link's info), not `pinned` (the `progs/` pin): after
/// an agent died between its first swap and its last repin, the two differ, and the next
/// agent must still complete the swap. `pinned` serves when the kernel reports no program.
fn update_link(
    path: &Path,
    new: BorrowedFd<'_>,
    pinned: BorrowedFd<'_>,
    done: &mut Vec<Done>,
) -> Result<(), Error> {
    let link = sys::obj_get(path).map_err(|e| Error::io("opening link", path, e))?;
    let running = sys::link_info(link.as_fd())
        .ok()
        .filter(|&(id, _)| id != 0)
        .and_then(|(id, _)| sys::prog_get_fd_by_id(id).ok());
    let old = running.as_ref().map_or(pinned, |fd| fd.as_fd());
    sys::link_update(link.as_fd(), new, old)
        .map_err(|e| Error::io("updating (BPF_LINK_UPDATE, Linux >= 5.7) link", path, e))?;
    let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
    let (old, new) = dup(old)
        .and_then(|o| Ok((o, dup(new)?)))
        .map_err(|e| Error::io("duplicating a program fd for", path, e))?;
    done.push(Done::Link { link, old, new });
    Ok(())
}

/// Puts the previous programs back, newest swap first.
fn rollback(done: Vec<Done>) {
    for d in done.into_iter().rev() {
        let result = match &d {
            Done::Link { link, old, new } => {
                sys::link_update(link.as_fd(), old.as_fd(), new.as_fd())
            }
            Done::SockHash { map, old } => {
                sys::prog_attach_map(old.as_fd(), map.as_fd(), sys::BPF_SK_MSG_VERDICT)
            }
        };
        if let Err(err) = result {
            warn!(%err, "rolling back a program swap failed: run `interceptor uninstall` and start the agent");
        }
    }
}

/// Every pod's pinned sk_lookup link.
fn pod_links(pins: &Pins) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(pins.pods_dir()) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .map(|e| e.path().join("sk_lookup"))
        .filter(|p| p.exists())
        .collect()
}

/// Points `progs/<name>` at the new program: pinned beside it, then renamed over it, so the
/// pin is never missing.
fn repin(ebpf: &mut Ebpf, pins: &Pins, name: &str) {
    let Some(p) = ebpf.program_mut(name) else {
        return;
    };
    let path = pins.prog(name);
    // bpffs refuses names with a dot (EPERM).
    let tmp = pins.progs_dir().join(format!("next_{name}"));
    let _ = fs::remove_file(&tmp);
    let result = p
        .pin(&tmp)
        .map_err(std::io::Error::other)
        .and_then(|()| fs::rename(&tmp, &path))
        .or_else(|_| {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&path);
            p.pin(&path).map_err(std::io::Error::other)
        });
    if let Err(err) = result {
        warn!(program = name, %err, "could not pin the new program; status shows the old one");
    }
}

/// The attached cgroup links stay on the cgroup they were attached to: a different `--cgroup`
/// cannot be applied in place.
fn check_cgroup(pins: &Pins, cgroup: &Path, report: &mut Report) {
    let Ok(wanted) = fs::metadata(cgroup).map(|m| m.ino()) else {
        return;
    };
    let link = pins.link(names::prog::CONNECT4);
    let Ok((_, attached)) = sys::obj_get(&link).and_then(|fd| sys::link_info(fd.as_fd())) else {
        return;
    };
    if attached != 0 && attached != wanted {
        report.not_applied.push(format!(
            "--cgroup {}: the programs stay attached to cgroup id {attached}, where the running \
             datapath was attached; run `interceptor uninstall` and start the agent to move them",
            cgroup.display()
        ));
    }
}

fn load(p: &mut Program) -> Result<(), ProgramError> {
    match p {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

fn unload(p: &mut Program) -> Result<(), ProgramError> {
    match p {
        Program::CgroupSockAddr(p) => p.unload(),
        Program::SockOps(p) => p.unload(),
        Program::CgroupSockopt(p) => p.unload(),
        Program::SkMsg(p) => p.unload(),
        Program::SkLookup(p) => p.unload(),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

fn program_err(program: &'static str, source: ProgramError) -> Error {
    Error::Program { program, source }
}
