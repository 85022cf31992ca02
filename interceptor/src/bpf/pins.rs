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
//! ```

use std::path::{Path, PathBuf};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/interceptor";
const RUN_DIR: &str = "/run/interceptor";

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
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

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}
