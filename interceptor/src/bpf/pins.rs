//! Where an instance keeps its state on bpffs, and its lock files under /run.
//!
//! One pin root is one instance: production uses `/sys/fs/bpf/interceptor`; tests give each
//! run its own root so they can run in parallel and never touch a real agent's state.
//!
//! ```text
//! <root>/maps/<MAP>            every map (pinned by name at load)
//! <root>/progs/<program>       programs, so any process can attach a pod's sk_lookup
//! <root>/links/<program>       cgroup links: the programs stay attached while these exist
//! <root>/pods/<id>/sk_lookup   each pod's netns link
//! <root>/maps_next/<MAP>       an ABI migration's new maps until they replace maps/
//! ```

use std::path::{Path, PathBuf};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/interceptor";
const RUN_DIR: &str = "/run/interceptor";
/// Pin directories: root's alone (see `create_private_dir`).
pub const PRIVATE_DIR_MODE: u32 = 0o700;

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
    /// Where the maps are pinned when not `<root>/maps` (an ABI migration's staging set).
    maps: Option<PathBuf>,
}

/// A pin root that would make teardown remove state this instance does not own.
#[derive(Debug, thiserror::Error)]
#[error(
    "--pin-root {}: {why}; use a directory of its own inside bpffs, e.g. {DEFAULT_ROOT}",
    root.display()
)]
pub struct PinRootError {
    root: PathBuf,
    why: &'static str,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            maps: None,
        }
    }

    /// The same instance with its maps pinned under `maps_next/`: where an ABI migration
    /// builds the new maps before they replace `maps/` (`bpf/migrate.rs`). (bpffs refuses
    /// names with a dot.)
    pub fn staging(&self) -> Self {
        Self {
            root: self.root.clone(),
            maps: Some(self.root.join("maps_next")),
        }
    }

    /// `new`, refusing a root that is a bpffs mount itself (or `/`): uninstall removes the
    /// whole root, which would take every other program's pins with it.
    pub fn checked(root: impl Into<PathBuf>) -> Result<Self, PinRootError> {
        let root = root.into();
        let resolved = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
        let err = |why| PinRootError {
            root: root.clone(),
            why,
        };
        if resolved.parent().is_none() {
            return Err(err("the filesystem root"));
        }
        if resolved == Path::new(super::features::BPFFS) || is_bpffs_mount(&resolved) {
            return Err(err(
                "that is a bpffs mount itself, shared with every other BPF program",
            ));
        }
        Ok(Self::new(root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.maps.clone().unwrap_or_else(|| self.root.join("maps"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }

    pub fn pod_dir(&self, pod_id: u32) -> PathBuf {
        self.pods_dir().join(pod_id.to_string())
    }

    pub fn pod_sk_lookup(&self, pod_id: u32) -> PathBuf {
        self.pod_dir(pod_id).join("sk_lookup")
    }

    /// Creates `dir` (inside this root) and the root itself owner-only (0700): a pinned map is
    /// the datapath's policy, and bpf(BPF_OBJ_GET) asks nothing of the caller but the path's
    /// permissions (the pins themselves are 0600, the kernel's default). Tightens directories
    /// an older agent left 0755.
    pub fn create_private_dir(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir)?;
        for d in [self.root.as_path(), dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
        }
        Ok(())
    }

    /// Whether programs are attached through this root (an agent runs or ran with
    /// `--keep-pinned`).
    pub fn is_live(&self) -> bool {
        self.links_dir().is_dir()
            && std::fs::read_dir(self.links_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Lock and state files of this instance (bpffs holds no regular files).
    pub fn run_dir(&self) -> PathBuf {
        let tag: String = self
            .root
            .to_string_lossy()
            .trim_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Path::new(RUN_DIR).join(tag)
    }
}

/// Whether `path` is where a bpffs is mounted: a bpffs on another device than its parent
/// (each bpffs mount is a superblock of its own). Asked of the path, not by reading
/// `/proc/self/mounts`: every `ip netns add` (and every CNI-made pod namespace) adds a mount,
/// and at 10 000 pods reading that file cost each `interceptor pod` command ~8 ms.
fn is_bpffs_mount(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let bpffs = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type().0 == super::features::BPF_FS_MAGIC);
    bpffs
        && match (
            std::fs::metadata(path),
            path.parent().map(std::fs::metadata),
        ) {
            (Ok(own), Some(Ok(parent))) => own.dev() != parent.dev(),
            _ => true,
        }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_bpffs_mount_and_the_filesystem_root() {
        for root in ["/sys/fs/bpf", "/sys/fs/bpf/", "/sys/fs/bpf/.", "/"] {
            let err = Pins::checked(root).expect_err(root).to_string();
            assert!(err.contains(DEFAULT_ROOT), "{err}");
        }
        assert!(Pins::checked(DEFAULT_ROOT).is_ok());
        assert!(Pins::checked("/sys/fs/bpf/icpt-test-x").is_ok());
    }
}
