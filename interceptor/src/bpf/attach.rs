//! Loading the program family, attaching it at the cgroup v2 root, pinning everything, adopting
//! what another agent pinned, and removing it all.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, Program, SkLookup, SkMsg,
        links::{FdLink, PinnedLink},
    },
};
use interceptor_common::{config::GlobalConfig, names};
use tracing::{debug, info, warn};

use super::{
    Error, Maps, OBJECT, Pins,
    maps::open_pinned,
    migrate, sys,
    upgrade::{self, Report},
};

/// What the agent asks of the loader.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The cgroup v2 directory the cgroup programs attach to (the root: every process).
    pub cgroup: PathBuf,
    pub config: GlobalConfig,
    /// Level of the programs' own log records (aya-log), e.g. Warn.
    pub bpf_log_level: aya_log::Level,
    /// Remove incompatible pinned state instead of refusing to start.
    pub replace: bool,
}

/// How this agent got its datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attached {
    /// Loaded and attached the programs itself.
    Loaded,
    /// Found them pinned and attached (another agent, or one that exited with --keep-pinned)
    /// and left them as they were.
    Adopted,
    /// Found them pinned and attached, and swapped in this build's programs where their code
    /// differs, keeping the maps.
    Upgraded,
    /// Found them pinned and attached by an older ABI, moved the maps to this ABI's layouts
    /// and swapped in every program (`bpf/migrate.rs`).
    Migrated,
}

/// A running datapath: the maps, and in `Loaded` mode the object that owns the log buffer.
pub struct Datapath {
    pub pins: Pins,
    pub maps: Maps,
    pub attached: Attached,
    /// Kept alive for aya-log: dropping it closes the log ring buffer.
    ebpf: Option<Ebpf>,
}

/// Programs attached to the cgroup root, with the kernel feature each one needs.
const CGROUP_PROGRAMS: &[(&str, &str)] = &[
    (
        names::prog::CONNECT4,
        "cgroup/connect4 with bpf_get_netns_cookie and bpf_bind (Linux >= 5.7)",
    ),
    (names::prog::CONNECT6, "cgroup/connect6 (Linux >= 5.7)"),
    (
        names::prog::SOCKOPS,
        "sockops with sockhash updates (Linux >= 5.7)",
    ),
    (names::prog::GETSOCKOPT, "cgroup/getsockopt (Linux >= 5.3)"),
];

impl Datapath {
    /// Upgrades the datapath pinned under `pins` in place if programs of this ABI are attached
    /// there (`bpf/upgrade.rs`), else loads, attaches and pins a fresh one. Records what it did
    /// for `interceptor status`.
    pub fn start(pins: Pins, opts: &LoadOptions) -> Result<Self, Error> {
        // A migration that died in its commit (two renames where bpffs cannot exchange) is
        // finished or undone first, so the ABI below is read from the maps that run.
        migrate::recover(&pins)?;
        if pins.is_live() {
            match check_pinned_abi(&pins, false) {
                Ok(()) => {
                    migrate::remove_leftovers(&pins);
                    return Self::upgrade(pins, opts);
                }
                Err(Error::AbiMismatch { found, .. }) => {
                    let migrated = migrate::plan(&pins, found)
                        .and_then(|plan| Self::migrate(pins.clone(), opts, &plan));
                    match migrated {
                        Ok(dp) => return Ok(dp),
                        // Never under a running agent: it would lose its datapath.
                        Err(err)
                            if opts.replace
                                && !matches!(err, Error::MigrationWhileRunning { .. }) =>
                        {
                            warn!(%err, "replacing the pinned datapath (--replace)");
                            teardown(&pins)?;
                        }
                        Err(err) => return Err(err),
                    }
                }
                Err(err) => return Err(err),
            }
        }
        let dp = Self::load(pins, opts)?;
        Report::new("loaded", opts.bpf_log_level as u8).record(&dp.pins);
        Ok(dp)
    }

    /// Loads this build's object against the pinned maps and swaps in the programs whose code
    /// differs. If that fails, the attached programs keep running (adopted) and the failure is
    /// reported in status: pods stay intercepted either way.
    fn upgrade(pins: Pins, opts: &LoadOptions) -> Result<Self, Error> {
        let level = opts.bpf_log_level as u8;
        let mut report = Report::new("upgraded", level);
        let result = (|| {
            if OBJECT.is_empty() {
                return Err(Error::NoObject);
            }
            let mut ebpf = load_object(&pins, opts)?;
            upgrade::swap_programs(&mut ebpf, &pins, &opts.cgroup, &mut report, false)?;
            let mut maps = Maps::open(&pins)?;
            maps.set_global_config(opts.config)?;
            Ok((ebpf, maps))
        })();
        let previous = Report::of_instance(&pins);
        let dp = match result {
            Ok((ebpf, maps)) => Self {
                pins,
                maps,
                attached: Attached::Upgraded,
                ebpf: Some(ebpf),
            },
            Err(err) => {
                warn!(%err, "could not upgrade the attached datapath; adopting it as it is");
                report = Report::new("adopted", level);
                report.not_applied.push(format!(
                    "this agent's programs and settings ({err}); the attached ones keep \
                     running: run `interceptor uninstall` and start the agent to load them"
                ));
                Self::adopt(pins)?
            }
        };
        if !report.unchanged.is_empty() && previous.is_some_and(|p| p.bpf_log_level != level) {
            report.not_applied.push(format!(
                "--bpf-log-level for the unchanged programs ({}): their log level is fixed \
                 at load; run `interceptor uninstall` and start the agent to apply it",
                report.unchanged.join(", ")
            ));
        }
        report.record(&dp.pins);
        Ok(dp)
    }

    /// Moves a datapath of an older ABI to this build's (`bpf/migrate.rs`): new maps staged and
    /// filled beside the old ones, every program swapped on its link, then the new maps' pins
    /// take the old ones' place. If anything fails before the commit, the old datapath runs on
    /// as it was and the error says so.
    fn migrate(pins: Pins, opts: &LoadOptions, plan: &migrate::Plan) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        // The old agent must be gone: it would go on writing the old maps (and its pod
        // commands attaching old programs) while this one moves them.
        let others: Vec<String> = crate::agent::running_agents(&pins)
            .into_iter()
            .filter(|&pid| pid != std::process::id())
            .map(|pid| pid.to_string())
            .collect();
        if !others.is_empty() {
            return Err(Error::MigrationWhileRunning {
                path: pins.root().to_owned(),
                found: plan.from(),
                pids: others.join(", "),
            });
        }
        // No `pod enable` between staging and commit: it would attach the old sk_lookup to
        // a pod after the swap looked for pods' links, and that link would never be swapped.
        let _pods = migrate::lock_pods(&pins)?;
        let start = std::time::Instant::now();
        let mut report = Report::new("migrated", opts.bpf_log_level as u8);
        let failed = |source: Error| Error::MigrationFailed {
            path: pins.root().to_owned(),
            found: plan.from(),
            expected: interceptor_common::ABI_VERSION,
            cause: Box::new(source),
        };
        let staging = plan.stage(&pins).map_err(failed)?;
        // A kept CONFIG is the very map the old programs read: written only once the new
        // programs run, so a rollback leaves the old settings. A new one is written before.
        let config_kept = plan.keeps(names::map::CONFIG);
        let result = (|| {
            let mut ebpf = load_object(&staging, opts)?;
            let mut maps = Maps::open(&staging)?;
            plan.fill(&pins, &staging, &mut report, || {
                // The registry is the old maps: read there, written here by `pod enable`'s code.
                let old = Maps::open_any_abi(&pins)?;
                let port = opts.config.inbound_port as u16;
                // With the per-pod listeners and the sockhash kept, their entries are there.
                let resolve = [
                    names::map::POD_LISTENER,
                    names::map::POD_LISTENER6,
                    names::map::LISTENERS,
                ]
                .iter()
                .any(|m| !plan.keeps(m));
                crate::registry::rebuild(&old, &mut maps, port, resolve)
                    .map(|done| (done.pods, done.skipped))
                    .map_err(|e| Error::Rebuild(Box::new(e)))
            })?;
            // Rebuilt before any new program runs: the ABI it writes (and a new CONFIG).
            if !config_kept {
                maps.set_global_config(opts.config)?;
            }
            maps.write_abi()?;
            upgrade::swap_programs(&mut ebpf, &staging, &opts.cgroup, &mut report, true)?;
            // Every old writer is swapped out: the connection maps' entries move to the new maps.
            plan.catch_up(&pins, &staging, &mut report);
            Ok((ebpf, maps))
        })();
        let (ebpf, mut maps) = result
            .inspect_err(|err| {
                warn!(%err, from = plan.from(), "migrating the attached datapath failed; it runs on as it was");
                migrate::abandon(&staging);
            })
            .map_err(failed)?;
        if config_kept && let Err(err) = maps.set_global_config(opts.config) {
            report.not_applied.push(format!(
                "this agent's global settings ({err}); the attached datapath runs with the \
                 previous agent's: restart the agent to write them"
            ));
        }
        drop(maps);
        migrate::commit(&pins, &staging)?;
        let maps = Maps::open(&pins)?;
        report.micros = start.elapsed().as_micros() as u64;
        migrate::log(&report, start.elapsed());
        report.record(&pins);
        Ok(Self {
            pins,
            maps,
            attached: Attached::Migrated,
            ebpf: Some(ebpf),
        })
    }

    /// Opens a datapath another agent pinned: no program is loaded or attached again.
    pub fn adopt(pins: Pins) -> Result<Self, Error> {
        let maps = Maps::open(&pins)?;
        info!(root = %pins.root().display(), "adopted pinned datapath");
        Ok(Self {
            pins,
            maps,
            attached: Attached::Adopted,
            ebpf: None,
        })
    }

    fn load(pins: Pins, opts: &LoadOptions) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        check_pinned_abi(&pins, opts.replace)?;
        let existed = pins.root().exists();
        Self::load_and_attach(pins.clone(), opts).inspect_err(|err| {
            // Never leave a half-attached datapath behind: a program the kernel rejected must
            // not leave the others intercepting without their partners.
            warn!(%err, "loading failed; detaching what was attached");
            if existed {
                for dir in [pins.links_dir(), pins.progs_dir()] {
                    let _ = fs::remove_dir_all(dir);
                }
            } else {
                let _ = teardown(&pins);
            }
        })
    }

    fn load_and_attach(pins: Pins, opts: &LoadOptions) -> Result<Self, Error> {
        for dir in [
            pins.maps_dir(),
            pins.progs_dir(),
            pins.links_dir(),
            pins.pods_dir(),
        ] {
            pins.create_private_dir(&dir)
                .map_err(|e| Error::io("creating", &dir, e))?;
        }
        let mut ebpf = load_object(&pins, opts)?;

        let mut maps = Maps::open(&pins)?;
        maps.set_global_config(opts.config)?;
        maps.write_abi()?;

        let cgroup =
            File::open(&opts.cgroup).map_err(|e| Error::io("opening cgroup", &opts.cgroup, e))?;
        for (name, needs) in CGROUP_PROGRAMS {
            attach_to_cgroup(&mut ebpf, &pins, &cgroup, name, needs)?;
        }
        attach_sk_msg(&mut ebpf, &pins)?;
        load_sk_lookup(&mut ebpf, &pins);
        attach_dns(&mut ebpf, &pins, &cgroup);

        info!(
            root = %pins.root().display(),
            cgroup = %opts.cgroup.display(),
            "loaded and attached the datapath"
        );
        Ok(Self {
            pins,
            maps,
            attached: Attached::Loaded,
            ebpf: Some(ebpf),
        })
    }

    /// The loaded object, when this agent loaded it (for the aya-log buffer).
    pub fn ebpf_mut(&mut self) -> Option<&mut Ebpf> {
        self.ebpf.as_mut()
    }
}

/// Loads this build's object: maps pinned by name under `maps/` are reused when they exist (so
/// an upgrade keeps every entry), created and pinned otherwise.
fn load_object(pins: &Pins, opts: &LoadOptions) -> Result<Ebpf, Error> {
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u32);
    let level = opts.bpf_log_level as u8;
    let netns_keys = u32::from(super::features::Features::probe().netns_keys());
    EbpfLoader::new()
        .default_map_pin_directory(pins.maps_dir())
        .override_global("PAGE_SIZE", &page_size, true)
        .override_global("NETNS_KEYS", &netns_keys, true)
        .override_global(aya_log::LEVEL, &level, false)
        .load(OBJECT)
        .map_err(Error::Load)
}

/// Refuses (or with `replace`, removes) pinned maps of another ABI before the loader reuses
/// them with a different layout.
fn check_pinned_abi(pins: &Pins, replace: bool) -> Result<(), Error> {
    if !pins.map(names::map::ABI).exists() {
        return Ok(());
    }
    let abi: aya::maps::Array<_, u32> = open_pinned(pins, names::map::ABI)?;
    let found = abi.get(&0, 0).map_err(|source| Error::Map {
        map: names::map::ABI,
        source,
    })?;
    if found == 0 || found == interceptor_common::ABI_VERSION {
        return Ok(());
    }
    let err = Error::AbiMismatch {
        path: pins.root().to_owned(),
        found,
        expected: interceptor_common::ABI_VERSION,
    };
    if !replace {
        return Err(err);
    }
    warn!(%err, "removing incompatible pinned state");
    teardown(pins)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, Error> {
    ebpf.program_mut(name).ok_or(Error::Program {
        program: name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })
}

fn attach_to_cgroup(
    ebpf: &mut Ebpf,
    pins: &Pins,
    cgroup: &File,
    name: &'static str,
    needs: &'static str,
) -> Result<(), Error> {
    let rejected = |source| Error::ProgramRejected {
        program: name,
        needs,
        source,
    };
    let wrong = |source| Error::Program {
        program: name,
        source,
    };
    // Attached with a bpf_link (Linux >= 5.7), which always coexists with other programs on
    // the cgroup; the kernel rejects any flag for links, so the mode must stay Single.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match program(ebpf, name)? {
        Program::CgroupSockAddr(p) => {
            load_and_pin(p, pins, name, |p| p.load(), |p, path| p.pin(path)).map_err(rejected)?;
            let id = p.attach(cgroup, mode).map_err(rejected)?;
            p.take_link(id)
                .map_err(wrong)?
                .try_into()
                .map_err(|source| link_err(pins, name, source))?
        }
        Program::SockOps(p) => {
            load_and_pin(p, pins, name, |p| p.load(), |p, path| p.pin(path)).map_err(rejected)?;
            let id = p.attach(cgroup, mode).map_err(rejected)?;
            p.take_link(id)
                .map_err(wrong)?
                .try_into()
                .map_err(|source| link_err(pins, name, source))?
        }
        Program::CgroupSockopt(p) => {
            load_and_pin(p, pins, name, |p| p.load(), |p, path| p.pin(path)).map_err(rejected)?;
            // See bpf/sys.rs: aya cannot turn this link into a pinnable FdLink.
            let prog = p.fd().map_err(rejected)?;
            let fd = sys::link_create(prog.as_fd(), cgroup.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0)
                .map_err(|e| {
                    Error::io(
                        "attaching cgroup/getsockopt to",
                        opts_cgroup_path(cgroup),
                        e,
                    )
                })?;
            let path = pins.link(name);
            sys::obj_pin(fd.as_fd(), &path).map_err(|e| Error::io("pinning", &path, e))?;
            debug!(program = name, "attached to the cgroup root");
            return Ok(());
        }
        _ => return Err(wrong(aya::programs::ProgramError::UnexpectedProgramType)),
    };
    let path = pins.link(name);
    // The pinned link is what keeps the program attached after this process exits.
    let _pinned: PinnedLink = link
        .pin(&path)
        .map_err(|source| Error::Pin { path, source })?;
    debug!(program = name, "attached to the cgroup root");
    Ok(())
}

/// The cgroup a descriptor refers to, for error messages.
fn opts_cgroup_path(cgroup: &File) -> PathBuf {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", cgroup.as_raw_fd())).unwrap_or_default()
}

fn link_err(pins: &Pins, name: &str, source: aya::programs::links::LinkError) -> Error {
    Error::Link {
        path: pins.link(name),
        source,
    }
}

/// Loads a program and pins it under `progs/` (so `pod enable` can attach sk_lookup from any
/// process, and `status` can find the programs).
fn load_and_pin<P>(
    p: &mut P,
    pins: &Pins,
    name: &str,
    load: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
    pin: impl FnOnce(&mut P, &Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), aya::programs::ProgramError> {
    load(p)?;
    let path = pins.prog(name);
    let _ = fs::remove_file(&path);
    if let Err(err) = pin(p, &path) {
        warn!(program = name, %err, "could not pin program");
    }
    Ok(())
}

/// sk_msg attaches to the sockhash itself: the attachment lives as long as the map does.
fn attach_sk_msg(ebpf: &mut Ebpf, pins: &Pins) -> Result<(), Error> {
    let name = names::prog::SK_MSG;
    let socks: aya::maps::SockHash<_, interceptor_common::sockmap::SockKey> =
        open_pinned(pins, names::map::SOCKS)?;
    let rejected = |source| Error::ProgramRejected {
        program: name,
        needs: "sk_msg with bpf_msg_redirect_hash (CONFIG_BPF_STREAM_PARSER, Linux >= 4.17)",
        source,
    };
    let Program::SkMsg(p) = program(ebpf, name)? else {
        return Err(Error::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        });
    };
    load_and_pin::<SkMsg>(p, pins, name, |p| p.load(), |p, path| p.pin(path)).map_err(rejected)?;
    let id = p.attach(socks.fd()).map_err(rejected)?;
    let link = p.take_link(id).map_err(|source| Error::Program {
        program: name,
        source,
    })?;
    // Dropping the link would detach the program from the map even while another agent uses
    // it; the kernel releases the attachment together with the map instead.
    std::mem::forget(link);
    Ok(())
}

/// sk_lookup is attached per pod; here it is only loaded and pinned. A kernel without it
/// (< 5.9) keeps outbound interception and reports inbound as unavailable.
fn load_sk_lookup(ebpf: &mut Ebpf, pins: &Pins) {
    let name = names::prog::SK_LOOKUP;
    let Ok(Program::SkLookup(p)) = program(ebpf, name) else {
        return;
    };
    if let Err(err) = load_and_pin::<SkLookup>(p, pins, name, |p| p.load(), |p, path| p.pin(path)) {
        warn!(
            %err,
            "sk_lookup is not available (Linux >= 5.9): inbound capture is disabled; \
             use iptables mode for pods that need it"
        );
    }
}

/// What the DNS capture programs need of the kernel.
const DNS_NEEDS: &str = "cgroup sendmsg4/6 (Linux >= 4.18) and recvmsg4/6 (Linux >= 5.2)";

/// DNS capture's programs, attached together or not at all: a kernel without them keeps the
/// rest of the datapath, and pods asking for DNS capture get iptables mode (`Mode::Auto`) or a
/// clear error (`--mode ebpf`).
fn attach_dns(ebpf: &mut Ebpf, pins: &Pins, cgroup: &File) {
    for name in names::prog::DNS {
        if let Err(err) = attach_to_cgroup(ebpf, pins, cgroup, name, DNS_NEEDS) {
            warn!(
                %err,
                "DNS capture is not available in eBPF mode ({DNS_NEEDS}): pods that ask for it \
                 need iptables mode"
            );
            // A half-attached set would capture queries whose replies nobody rewrites.
            for name in names::prog::DNS {
                let _ = fs::remove_file(pins.link(name));
                let _ = fs::remove_file(pins.prog(name));
            }
            return;
        }
    }
}

/// Whether DNS capture's programs are attached (this kernel has the hooks).
pub(crate) fn dns_capture_available(pins: &Pins) -> bool {
    names::prog::DNS.iter().all(|name| pins.link(name).exists())
}

/// Removes everything pinned under `pins`: the kernel detaches a link when its last reference
/// (the pin) goes, and frees maps and programs nobody holds.
pub fn teardown(pins: &Pins) -> Result<(), Error> {
    if !pins.root().exists() {
        return Ok(());
    }
    detach_pods(pins);
    fs::remove_dir_all(pins.root()).map_err(|e| Error::io("removing", pins.root(), e))?;
    let _ = fs::remove_dir_all(pins.run_dir());
    info!(root = %pins.root().display(), "removed the pinned datapath");
    Ok(())
}

/// Unpins every pod's sk_lookup link (the kernel detaches each), saying how far it got each
/// second: one unpin per pod, so the one step of a teardown that grows with the node
/// (measured: see the README's "Node scale"). Errors are left to the `remove_dir_all` after.
fn detach_pods(pins: &Pins) {
    let Ok(dir) = fs::read_dir(pins.pods_dir()) else {
        return;
    };
    let pods: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
    if pods.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let mut said = started;
    info!(pods = pods.len(), "detaching the pods' sk_lookup links");
    for (done, pod) in pods.iter().enumerate() {
        let _ = fs::remove_dir_all(pod);
        if said.elapsed() >= std::time::Duration::from_secs(1) {
            info!(
                done = done + 1,
                of = pods.len(),
                "detaching the pods' sk_lookup links"
            );
            said = std::time::Instant::now();
        }
    }
    info!(
        pods = pods.len(),
        seconds = started.elapsed().as_secs_f64(),
        "detached the pods' sk_lookup links"
    );
}

/// Attaches the pinned sk_lookup program to a network namespace and pins the link under the
/// pod's directory.
pub(crate) fn attach_sk_lookup(pins: &Pins, pod_id: u32, netns: &File) -> Result<PathBuf, Error> {
    let name = names::prog::SK_LOOKUP;
    let prog_path = pins.prog(name);
    let mut prog = SkLookup::from_pin(&prog_path).map_err(|source| Error::ProgramRejected {
        program: name,
        needs: "sk_lookup (Linux >= 5.9)",
        source,
    })?;
    let id = prog.attach(netns).map_err(|source| Error::Program {
        program: name,
        source,
    })?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|source| Error::Program {
            program: name,
            source,
        })?
        .into();
    let dir = pins.pod_dir(pod_id);
    pins.create_private_dir(&dir)
        .map_err(|e| Error::io("creating", &dir, e))?;
    let path = pins.pod_sk_lookup(pod_id);
    let _ = fs::remove_file(&path);
    link.pin(&path).map_err(|source| Error::Pin {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Whether the pinned sk_lookup program exists (loaded on this kernel).
pub(crate) fn sk_lookup_available(pins: &Pins) -> bool {
    pins.prog(names::prog::SK_LOOKUP).exists()
}

/// Detaches a pod's sk_lookup by removing its pinned link.
pub(crate) fn detach_pod(pins: &Pins, pod_id: u32) -> Result<(), Error> {
    let dir = pins.pod_dir(pod_id);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_programs_named_as_in_the_object() {
        for name in CGROUP_PROGRAMS
            .iter()
            .map(|(name, _)| name)
            .chain(&names::prog::DNS)
        {
            assert!(name.len() <= 15, "{name} is longer than bpftool shows");
        }
    }
}
