//! The Linux capabilities the agent runs with, each named with what needs it, so it can run as
//! root with exactly these (the DaemonSet drops ALL and adds them) instead of privileged.
//!
//! Measured on Linux 6.18 (`tests/src/tests/privileges.rs` drops each one and sees the failure):
//! - CAP_SYS_ADMIN: `setns()` into a pod's network namespace (sock_diag for the proxy's
//!   listener, the pod's addresses, iptables mode) demands it, and nothing narrower does. Since
//!   the agent must hold it, the kernel's `bpf_capable()`, `bpf_net_capable()` and
//!   `perfmon_capable()` are satisfied by it too: CAP_BPF and CAP_PERFMON add nothing, and the
//!   BPF program types and SOCKHASH need no CAP_NET_ADMIN.
//! - CAP_SYS_PTRACE: another process's `/proc/PID/ns/net`, and `pidfd_getfd` of a proxy listener that predates the datapath, pass the ptrace access check
//!   only with it once the agent's capabilities are not a superset of the target's.
//! - CAP_NET_ADMIN: iptables mode writes the nat table in the pod's namespace (netfilter checks
//!   CAP_NET_ADMIN there, CAP_SYS_ADMIN does not stand in).
//! - CAP_NET_RAW: iptables mode with the legacy backend only (x_tables over a raw socket).
//! - CAP_SYS_RESOURCE: only on Linux < 5.11, which charges BPF memory to RLIMIT_MEMLOCK.

use std::io;

/// Set to `1` to skip the start-up check: only for showing what the kernel itself refuses
/// without a capability (the privilege tests); a real agent fails early instead.
pub const SKIP_CHECK_ENV: &str = "INTERCEPTOR_SKIP_CAPABILITY_CHECK";

/// The capabilities interceptor can ask for (numbers from `linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    NetAdmin,
    NetRaw,
    SysPtrace,
    SysAdmin,
    SysResource,
    Perfmon,
    Bpf,
}

impl Capability {
    pub const fn bit(self) -> u32 {
        match self {
            Self::NetAdmin => 12,
            Self::NetRaw => 13,
            Self::SysPtrace => 19,
            Self::SysAdmin => 21,
            Self::SysResource => 24,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::NetRaw => "CAP_NET_RAW",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::SysResource => "CAP_SYS_RESOURCE",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }

    /// Whether the calling thread has it in its effective set. An unreadable status counts as
    /// having it: the operation itself then says what the kernel refused.
    pub fn is_effective(self) -> bool {
        effective().is_none_or(|set| set & (1 << self.bit()) != 0)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability and the operation that needs it.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub cap: Capability,
    pub why: &'static str,
}

pub const SETNS: Need = Need {
    cap: Capability::SysAdmin,
    why: "setns() into pods' network namespaces (proxy listener lookup, pod addresses, \
          iptables mode); with it bpf() needs no CAP_BPF, CAP_PERFMON or CAP_NET_ADMIN",
};
pub const IPTABLES: Need = Need {
    cap: Capability::NetAdmin,
    why: "iptables mode: the nat table in a pod's network namespace",
};
pub const PTRACE: Need = Need {
    cap: Capability::SysPtrace,
    why: "reading other processes' /proc/PID/ns/net, pidfd_getfd of a proxy listener that \
          predates the datapath",
};
pub const MEMLOCK: Need = Need {
    cap: Capability::SysResource,
    why: "raising RLIMIT_MEMLOCK for BPF maps (Linux < 5.11 only)",
};
pub const IPTABLES_LEGACY: Need = Need {
    cap: Capability::NetRaw,
    why: "iptables mode with the legacy backend (x_tables over a raw socket)",
};

/// What `interceptor agent` needs on every kernel it supports (any pod may ask for iptables
/// mode, so CAP_NET_ADMIN is checked at start rather than when the first such pod comes).
pub const AGENT: &[Need] = &[SETNS, PTRACE, IPTABLES];
/// What `interceptor pod enable` needs (it enters the pod and finds its listener; iptables
/// mode is checked by the rules' own failure).
pub const POD_ENABLE: &[Need] = &[SETNS, PTRACE];

/// Some of the needed capabilities are not in the effective set.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} is missing {}: give it these capabilities (as root, in its bounding set; in \
     Kubernetes, securityContext.capabilities.add). They are needed for: {}",
    names(.missing), reasons(.missing)
)]
pub struct Missing {
    what: &'static str,
    missing: Vec<Need>,
}

fn names(needs: &[Need]) -> String {
    needs
        .iter()
        .map(|n| n.cap.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn reasons(needs: &[Need]) -> String {
    needs
        .iter()
        .map(|n| format!("{} ({})", n.cap.name(), n.why))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fails with every missing capability of `needs`, unless [`SKIP_CHECK_ENV`] is set.
pub fn check(what: &'static str, needs: &[Need]) -> Result<(), Missing> {
    if std::env::var_os(SKIP_CHECK_ENV).is_some_and(|v| v == "1") {
        return Ok(());
    }
    let missing: Vec<Need> = needs
        .iter()
        .filter(|n| !n.cap.is_effective())
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing { what, missing })
    }
}

/// For an error the kernel gave: when it is EPERM/EACCES and `cap` is not effective, a clause
/// naming the capability, to append to the message; else empty.
pub fn hint(err: &io::Error, cap: Capability) -> String {
    if err.kind() == io::ErrorKind::PermissionDenied {
        denied_hint(Some(libc::EACCES), cap)
    } else {
        denied_hint(err.raw_os_error(), cap)
    }
}

/// [`hint`] for a raw errno.
pub fn denied_hint(errno: Option<i32>, cap: Capability) -> String {
    match errno {
        Some(libc::EPERM | libc::EACCES) if !cap.is_effective() => {
            format!(" (this process lacks {cap})")
        }
        _ => String::new(),
    }
}

/// Whether any error in `err`'s source chain is EPERM/EACCES from the kernel.
pub fn is_denied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && (io.kind() == io::ErrorKind::PermissionDenied
                || matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)))
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The first of `caps` missing from the effective set, as a clause for an error message.
pub fn lacking(caps: &[Capability]) -> String {
    let missing: Vec<&str> = caps
        .iter()
        .filter(|c| !c.is_effective())
        .map(|c| c.name())
        .collect();
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (this process lacks {})", missing.join(", "))
    }
}

/// For a `bpf()` error: when the kernel refused (EPERM/EACCES anywhere in the chain), which of
/// the capabilities `bpf()` checks this process lacks, as a clause for the message.
pub fn bpf_lacking(err: &(dyn std::error::Error + 'static)) -> String {
    if !is_denied(err) {
        return String::new();
    }
    let mut missing = Vec::new();
    if !Capability::NetAdmin.is_effective() {
        missing.push("CAP_NET_ADMIN");
    }
    // bpf_capable(): either one will do.
    if !Capability::Bpf.is_effective() && !Capability::SysAdmin.is_effective() {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (this process lacks {})", missing.join(", "))
    }
}

/// `CapEff` of `/proc/thread-self/status`.
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn bits_match_linux_capability_h() {
        assert_eq!(Capability::SysAdmin.bit(), 21);
        assert_eq!(Capability::Bpf.bit(), 39);
        assert_eq!(Capability::NetAdmin.bit(), 12);
    }

    #[test]
    fn the_message_names_each_missing_capability_and_its_use() {
        let err = Missing {
            what: "the agent",
            missing: vec![PTRACE, SETNS],
        }
        .to_string();
        assert!(
            err.starts_with("the agent is missing CAP_SYS_PTRACE, CAP_SYS_ADMIN:"),
            "{err}"
        );
        assert!(err.contains("pidfd_getfd"), "{err}");
    }
}
