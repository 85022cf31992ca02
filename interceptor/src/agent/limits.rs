//! The agent's resource limits: RLIMIT_MEMLOCK where the kernel charges BPF memory to it
//! (Linux < 5.11, before memcg accounting), RLIMIT_NOFILE for the pods' namespaces it holds.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing::debug;

/// What the datapath can charge to RLIMIT_MEMLOCK on Linux < 5.11: about 40–50 MiB for one
/// set of maps (`interceptor status`, "maps"; every map counts at full size there), twice that
/// while an upgrade holds the old set and the new one; rounded up.
pub(super) const MEMLOCK_NEEDED: u64 = 256 << 20;

/// An rlimit, `u64::MAX` for unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limit {
    pub(super) soft: u64,
    pub(super) hard: u64,
}

impl Limit {
    fn read(resource: Resource) -> Limit {
        let (soft, hard) = getrlimit(resource).unwrap_or((0, 0));
        Limit { soft, hard }
    }

    fn write(resource: Resource, soft: u64, hard: u64) -> bool {
        setrlimit(resource, soft, hard).is_ok()
    }
}

/// `64.0 KiB`, `unlimited`.
pub(super) fn show(bytes: u64) -> String {
    if bytes == libc::RLIM_INFINITY {
        return "unlimited".into();
    }
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!()
}

/// Whether this kernel charges BPF maps and programs to RLIMIT_MEMLOCK.
pub(super) fn kernel_charges_memlock(release: &str) -> bool {
    crate::bpf::features::kernel_below(release, (5, 11))
}

pub(super) fn memlock() -> Limit {
    Limit::read(Resource::RLIMIT_MEMLOCK)
}

/// Whether the agent needs CAP_SYS_RESOURCE for its memlock limit: only where the kernel
/// charges it and the hard limit is below what the datapath needs (up to the hard limit, the
/// soft one goes up without any capability).
pub(super) fn memlock_needs_capability(kernel_charges: bool, now: Limit) -> bool {
    kernel_charges && now.hard < MEMLOCK_NEEDED
}

/// Raises RLIMIT_MEMLOCK to unlimited when allowed (CAP_SYS_RESOURCE), else the soft limit to
/// the hard one. Returns the limit in force afterwards.
pub(super) fn raise_memlock() -> Limit {
    let inf = libc::RLIM_INFINITY;
    if !Limit::write(Resource::RLIMIT_MEMLOCK, inf, inf) {
        let now = memlock();
        if now.soft < now.hard && !Limit::write(Resource::RLIMIT_MEMLOCK, now.hard, now.hard) {
            debug!(
                "could not raise the memlock soft limit to {}",
                show(now.hard)
            );
        }
    }
    memlock()
}

/// The agent holds a descriptor per pod (their namespaces, `discovery::held`): container
/// runtimes often start it at a soft limit of 1 024, so the soft limit goes up to the hard one
/// (raising the hard one would need CAP_SYS_RESOURCE, which the agent does not ask for).
pub(super) fn raise_nofile() {
    let now = Limit::read(Resource::RLIMIT_NOFILE);
    if now.soft < now.hard && !Limit::write(Resource::RLIMIT_NOFILE, now.hard, now.hard) {
        debug!("could not raise the open-file soft limit to {}", now.hard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_is_needed_only_where_memlock_is_charged_and_too_low() {
        let low = Limit {
            soft: 64 << 10,
            hard: 64 << 10,
        };
        let raisable = Limit {
            soft: 64 << 10,
            hard: libc::RLIM_INFINITY,
        };
        assert!(memlock_needs_capability(true, low));
        assert!(!memlock_needs_capability(true, raisable));
        assert!(!memlock_needs_capability(false, low));
        assert!(kernel_charges_memlock("5.10.0-46-cloud-amd64"));
        assert!(!kernel_charges_memlock("5.11.0"));
        assert!(!kernel_charges_memlock("6.18.44-fc-v1272"));
    }

    #[test]
    fn limits_read_as_people_write_them() {
        assert_eq!(show(65536), "64.0 KiB");
        assert_eq!(show(256 << 20), "256.0 MiB");
        assert_eq!(show(libc::RLIM_INFINITY), "unlimited");
        assert_eq!(show(100), "100 B");
    }
}
