//! The iptables interception `istio-iptables` writes, for kernels or pods where the eBPF path
//! cannot be used, and as the baseline every benchmark compares against.
//!
//! The rules are Istio's own (REDIRECT mode, nat table, see the reference article): PREROUTING →
//! ISTIO_INBOUND → ISTIO_IN_REDIRECT (→ 15006), OUTPUT → ISTIO_OUTPUT (127.0.0.6 passthrough,
//! the proxy's UID/GID, loopback) → ISTIO_REDIRECT (→ 15001). They are applied atomically
//! with `iptables-restore --noflush` inside the pod's network namespace and removed exactly:
//! only the ISTIO_* chains and the two jumps into them, so the namespace's other rules stay.

mod backend;
mod rules;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use interceptor_common::config::{PASSTHROUGH_V4, PASSTHROUGH_V6};
use serde::Serialize;
use tracing::{debug, info};

pub use self::{
    backend::{Backend, BackendChoice},
    rules::{Family, RuleSet},
};
use crate::{
    capabilities::{self, Capability},
    discovery::netns::Netns,
    registry::spec::PodSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "running {program}: {source}. Install iptables (`cargo xtask setup`, or `apt-get install \
         iptables`)"
    )]
    Missing {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` in {netns} failed: {stderr}")]
    Failed {
        command: String,
        netns: PathBuf,
        stderr: String,
    },
    #[error(
        "Istio chains already exist in {netns} ({backend}): another interception is applied \
         there; remove it first (`interceptor iptables remove --netns ...`)"
    )]
    AlreadyApplied { netns: PathBuf, backend: Backend },
    #[error(transparent)]
    Netns(#[from] crate::discovery::netns::Error),
}

/// Everything the rules need besides the pod's switches.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Source of the proxy's inbound passthrough hop (Istio: 127.0.0.6 / ::6).
    pub passthrough_v4: Ipv4Addr,
    pub passthrough_v6: Ipv6Addr,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            passthrough_v4: Ipv4Addr::from(PASSTHROUGH_V4),
            passthrough_v6: Ipv6Addr::from(PASSTHROUGH_V6),
        }
    }
}

/// What `apply` did, for `--json` and the pod registry.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub backend: Backend,
    pub families: Vec<Family>,
    pub rules: usize,
}

/// Applies the rules for `spec` in `netns`, both families. All or nothing: it fails without
/// touching anything if Istio chains are already there (either family), and takes the IPv4
/// rules back out if the IPv6 ones cannot be applied.
pub fn apply(
    netns: &Netns,
    spec: &PodSpec,
    settings: &Settings,
    backend: Backend,
) -> Result<Applied, Error> {
    let families = [Family::V4, Family::V6];
    for family in families {
        if rules::has_istio_chains(&save(netns, backend, family)?) {
            return Err(Error::AlreadyApplied {
                netns: netns.path().to_owned(),
                backend,
            });
        }
    }
    let mut count = 0;
    for family in families {
        let set = RuleSet::new(spec, settings, family);
        let restore = run_tool(
            netns,
            backend.restore(family),
            &["--noflush"],
            Some(set.restore_script()),
        );
        if let Err(err) = restore {
            if family != Family::V4 {
                // Never half-applied: the IPv4 rules go again.
                let _ = remove(netns, backend);
            }
            return Err(err);
        }
        count += set.rule_count();
    }
    info!(netns = %netns.path().display(), %backend, rules = count, "iptables interception applied");
    Ok(Applied {
        backend,
        families: families.to_vec(),
        rules: count,
    })
}

/// Removes exactly what `apply` added (the jumps into ISTIO_* chains, then the chains), for
/// both families. Returns how many rules went; 0 when nothing was applied.
pub fn remove(netns: &Netns, backend: Backend) -> Result<usize, Error> {
    let mut removed = 0;
    for family in [Family::V4, Family::V6] {
        // DNS capture's conntrack zones live in the raw table's built-in chains. A raw table
        // that cannot be read (no iptable_raw) holds none of ours: apply could not write it.
        let raw = run_tool(netns, backend.save(family), &["-t", "raw"], None).unwrap_or_default();
        if let Some((script, count)) = rules::raw_removal_script(&raw) {
            run_tool(netns, backend.restore(family), &["--noflush"], Some(script))?;
            removed += count;
        }
        let existing = save(netns, backend, family)?;
        let Some((script, count)) = rules::removal_script(&existing) else {
            continue;
        };
        run_tool(netns, backend.restore(family), &["--noflush"], Some(script))?;
        removed += count;
    }
    if removed > 0 {
        info!(netns = %netns.path().display(), %backend, rules = removed, "iptables interception removed");
    }
    Ok(removed)
}

/// The backend to use in `netns`: a fixed choice as is; for `auto`, the one whose tables
/// already hold Istio chains (to remove them), else the one holding any rules there, else the
/// machine's default — a namespace's rules must all go through one backend.
pub fn resolve(netns: &Netns, choice: BackendChoice) -> Backend {
    if let BackendChoice::Fixed(backend) = choice {
        return backend;
    }
    let candidates = [Backend::Nft, Backend::Legacy];
    let saves: Vec<(Backend, String)> = candidates
        .iter()
        .filter_map(|&b| save(netns, b, Family::V4).ok().map(|s| (b, s)))
        .collect();
    if let Some((b, _)) = saves.iter().find(|(_, s)| rules::has_istio_chains(s)) {
        return *b;
    }
    let rule_count = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
    match saves.iter().max_by_key(|(_, s)| rule_count(s)) {
        Some((b, s)) if rule_count(s) > 0 => *b,
        _ => Backend::system_default(),
    }
}

/// The nat table of `netns` as `iptables-save` prints it.
pub fn save(netns: &Netns, backend: Backend, family: Family) -> Result<String, Error> {
    run_tool(netns, backend.save(family), &["-t", "nat"], None)
}

/// Whether Istio chains are present in `netns` (either family).
pub fn is_applied(netns: &Netns, backend: Backend) -> Result<bool, Error> {
    for family in [Family::V4, Family::V6] {
        if rules::has_istio_chains(&save(netns, backend, family)?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs an iptables tool inside `netns`, feeding `stdin`, and returns its stdout.
///
/// One retry on EFAULT: before Linux 6.9 (and on kernels without the fix), a getsockopt that
/// races the first cgroup/getsockopt program being attached anywhere on the machine fails with
/// EFAULT (`do_sock_getsockopt` reads the "BPF enabled" switch twice). iptables' table reads
/// are getsockopts, and an agent attaching at that moment is exactly such a race.
///
/// `program` (an iptables tool) runs inside `netns` with `stdin` fed in; returns its stdout.
pub fn run_tool(
    netns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<String, Error> {
    match run_once(netns, program, args, stdin.clone()) {
        Err(Error::Failed { stderr, .. }) if stderr.contains("Bad address") => {
            debug!(
                program,
                "EFAULT from the kernel's getsockopt race; retrying once"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            run_once(netns, program, args, stdin)
        }
        other => other,
    }
}

fn run_once(
    netns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<String, Error> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = format!("{program} {}", args.join(" "));
    debug!(netns = %netns.path().display(), %command, "running");
    let out = spawn_in(netns, &mut cmd, stdin).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::Missing {
            program: program.to_owned(),
            source,
        },
        // The child enters the pod's namespace before exec: setns() is what can be refused.
        _ => Error::Failed {
            command: command.clone(),
            netns: netns.path().to_owned(),
            stderr: format!(
                "{source}{}",
                capabilities::hint(&source, Capability::SysAdmin)
            ),
        },
    })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // iptables says "Permission denied (you must be root)" whatever it lacked: name it.
        if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
            stderr.push_str(&capabilities::lacking(&[
                Capability::NetAdmin,
                Capability::NetRaw,
            ]));
        }
        return Err(Error::Failed {
            command,
            netns: netns.path().to_owned(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_in(netns: &Netns, cmd: &mut Command, stdin: Option<String>) -> io::Result<Output> {
    use std::io::Write as _;
    let mut child = netns.spawn(cmd)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    child.wait_with_output()
}
