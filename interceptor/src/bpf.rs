//! The kernel side as user space sees it: the embedded object, where its state is pinned, how it
//! is loaded and attached, typed handles to its maps, and what the running kernel supports.

pub(crate) mod attach;
pub mod features;
pub mod logs;
pub mod maps;
mod migrate;
pub mod occupancy;
pub mod pins;
mod sys;
pub mod upgrade;

use std::{io, path::PathBuf};

pub use attach::{Attached, Datapath, LoadOptions, teardown};
pub use maps::Maps;
pub use pins::Pins;

/// The compiled program family (interceptor-ebpf), built by build.rs.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor.bpf.o"));

/// How many kernel links (cgroup, netns attachments) point at program `id` right now.
pub fn links_of(id: u32) -> usize {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.program_id() == id)
        .count()
}

/// Whether the netns link pinned at `path` (a pod's sk_lookup) is still attached to a network
/// namespace: the kernel detaches it when the namespace goes (its `netns_ino` reads 0).
pub fn netns_link_attached(path: &std::path::Path) -> std::io::Result<bool> {
    use std::os::fd::AsFd as _;
    let link = sys::obj_get(path)?;
    let (_, target) = sys::link_info(link.as_fd())?;
    Ok(target as u32 != 0)
}

/// Whether program `id` is still loaded in the kernel (held by a pin, link or descriptor).
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this interceptor binary was built without its eBPF programs (INTERCEPTOR_EBPF_STUB); \
         rebuild after `cargo xtask setup`"
    )]
    NoObject,
    #[error(
        "loading the eBPF object failed: {0}{lacks}",
        lacks = crate::capabilities::bpf_lacking(.0)
    )]
    Load(#[source] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel rejected program {program} ({source}){}; it needs {needs}. \
         Run `interceptor status` to see what this kernel supports",
        crate::capabilities::bpf_lacking(.source)
    )]
    ProgramRejected {
        program: &'static str,
        needs: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}{}", crate::capabilities::bpf_lacking(.source))]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {map} is missing from {path}: is the agent running? (start `interceptor agent`)")]
    MapNotPinned { map: &'static str, path: PathBuf },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "the state pinned under {path} was written by an incompatible interceptor (ABI {found}, \
         this binary uses {expected}): programs of one ABI are upgraded in place, and only \
         a newer agent migrates an older ABI's maps (`interceptor_common::layout`). Stop the \
         old agent, then either run `interceptor uninstall` \
         and start this one, or start this one with --replace (pods are not intercepted until \
         it has listed them again)"
    )]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "the state pinned under {path} was written by interceptor ABI {found}; this binary (ABI \
         {expected}) cannot migrate it: {why}. Stop the old agent, then either run `interceptor \
         uninstall` and start this one, or start this one with --replace (pods are not \
         intercepted until it has listed them again)"
    )]
    AbiNotMigratable {
        path: PathBuf,
        found: u32,
        expected: u32,
        why: String,
    },
    #[error(
        "migrating the datapath pinned under {path} from ABI {found} to ABI {expected} failed \
         ({cause}); nothing was changed: the old datapath runs on and pods stay intercepted. \
         To move to this build, stop the old agent, then either run `interceptor uninstall` \
         and start this one, or start this one with --replace (pods are not intercepted until \
         it has listed them again)"
    )]
    MigrationFailed {
        path: PathBuf,
        found: u32,
        expected: u32,
        /// Shown in the message (which goes on after it), so not a `source`: `{err:#}` would
        /// print it again.
        cause: Box<Error>,
    },
    #[error(
        "another agent of this instance runs (pid {pids}) on the datapath of ABI {found} \
         pinned under {path}: stop the old agent first, then start this one to migrate it"
    )]
    MigrationWhileRunning {
        path: PathBuf,
        found: u32,
        pids: String,
    },
    /// The cause is shown in the message, so not a `source` (`{err:#}` would print it again).
    #[error("rebuilding the pod registry's maps: {0}")]
    Rebuild(Box<dyn std::error::Error + Send + Sync>),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed migration's cause shows once in the agent's `error: {err:#}`.
    #[test]
    fn a_migration_failure_names_its_cause_once() {
        let inner = io::Error::other("the inner cause");
        let err = Error::MigrationFailed {
            path: "/sys/fs/bpf/icpt".into(),
            found: 7,
            expected: 8,
            cause: Box::new(Error::Rebuild(Box::new(Error::io("opening", "/x", inner)))),
        };
        let text = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(text.matches("the inner cause").count(), 1, "{text}");
        assert_eq!(
            text.matches("rebuilding the pod registry").count(),
            1,
            "{text}"
        );
    }
}
