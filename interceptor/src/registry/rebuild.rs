//! The pod registry written again into another set of maps: an ABI migration's new maps
//! (`bpf/migrate.rs`, `Migration::FromRegistry` in `interceptor_common::layout`).
//!
//! The registry is the pinned maps themselves (see the module above), so the old set is where
//! the pods are read from: their identity records, configs and rows. Each pod is then written by
//! [`Maps::insert_pod`], the code `pod enable` writes with, and each inbound pod's proxy
//! listener is found again by `listeners::resolve`, the agent's listener resolution (the
//! listener sockhash holds sockets, which no map read returns; the resolution borrows them
//! from the proxy). Nobody changes the registry meanwhile: the migration holds its lock from
//! staging to commit.
//!
//! Reading the old set: ABIs 6 to 8 share the registry maps' key and value types, so the old
//! maps are read with this build's `Maps`. A build that changes one of those types reads the
//! older ABIs' maps with their frozen types here, and `pod_config`/`pod_rows` (`datapath.rs`)
//! give the new fields their values.

use std::collections::HashSet;

use interceptor_common::pod::{MODE_EBPF, POD_INBOUND};
use tracing::{debug, info, warn};

use super::{Error, locate, pod_name};
use crate::{
    bpf::{Maps, maps::ListenerFamily},
    capabilities,
    discovery::{listeners, netns::Netns},
};

/// What a rebuild wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub pods: usize,
    /// Inbound pods whose proxy listener was registered in the new maps.
    pub listeners: usize,
    /// Inbound pods whose live listener was not registered because the pod (its network
    /// namespace) or its listener went away during the rebuild: the agent's first pass
    /// collects the pod, or finds its listener again.
    pub skipped: Vec<String>,
}

/// Writes every pod of `old` into `new`, whose registry maps are fresh or the very objects of
/// `old` (kept: the same values are written again). `inbound_port` is the proxy's inbound
/// listener port; with `resolve_listeners` false (the per-pod listener maps and the listener
/// sockhash are all kept, and so are their entries) no listener is looked for. Fails if a pod
/// does not fit, or if an inbound pod whose listener was live in `old` cannot have it in `new`
/// for a reason other than the pod or its listener going away meanwhile (denied, or still
/// there): inbound connections to it would then find no proxy after the swap. The caller then
/// abandons the migration and the old datapath runs on.
pub fn rebuild(
    old: &Maps,
    new: &mut Maps,
    inbound_port: u16,
    resolve_listeners: bool,
) -> Result<Rebuilt, Error> {
    // The staged maps are this process's alone until the swap: a session spares each pod's
    // listener check a walk of the growing staged `LISTENERS` (O(pods²) at node scale).
    new.begin_session();
    let rebuilt = rebuild_pods(old, new, inbound_port, resolve_listeners);
    new.end_session();
    rebuilt
}

fn rebuild_pods(
    old: &Maps,
    new: &mut Maps,
    inbound_port: u16,
    resolve_listeners: bool,
) -> Result<Rebuilt, Error> {
    let infos = old.pod_infos();
    let cookies: Vec<(u32, u64)> = infos
        .iter()
        .map(|(id, info)| (*id, info.netns_cookie))
        .collect();
    let configs = old.pod_configs();
    let mut rows = old.pods_rows(&cookies);
    let live = old.listener_cookies();
    let mut done = Rebuilt::default();
    for (id, info) in &infos {
        let name = pod_name(info);
        let map_write = |source: crate::bpf::maps::WriteError| Error::MapWrite {
            map: source.map,
            pod: name.clone(),
            source: source.source,
        };
        // iptables-mode pods have only their identity record here (their rules are iptables').
        if info.mode != MODE_EBPF {
            new.put_pod_info(*id, *info).map_err(map_write)?;
            done.pods += 1;
            continue;
        }
        let pod_rows = rows.remove(id).unwrap_or_default();
        match configs.get(&info.netns_cookie) {
            Some(config) => new
                .insert_pod(*id, info, config, &pod_rows)
                .map_err(map_write)?,
            // A pod whose switch a dead `pod disable` already removed: as it was, off.
            None => new.restore_pod(*id, info, None, &pod_rows),
        }
        done.pods += 1;
        let inbound = configs
            .get(&info.netns_cookie)
            .is_some_and(|c| c.flags & POD_INBOUND != 0);
        if !inbound || !resolve_listeners {
            continue;
        }
        match register_listener(old, new, *id, info, inbound_port, &live)? {
            Registered::Yes => done.listeners += 1,
            Registered::No => {}
            Registered::Skipped => done.skipped.push(name),
        }
    }
    info!(
        pods = done.pods,
        listeners = done.listeners,
        skipped = ?done.skipped,
        "rebuilt the pod registry's maps"
    );
    Ok(done)
}

/// Whether [`register_listener`] registered the pod's listener.
#[derive(Debug, PartialEq, Eq)]
enum Registered {
    Yes,
    /// The pod had no live listener (or is gone): nothing to register.
    No,
    /// It had one, but the pod or the listener went away meanwhile.
    Skipped,
}

/// Registers the pod's proxy listener in `new` (`listeners::resolve`). An error only where
/// `old` had a live one and it is neither gone nor the pod ([`judge`]).
fn register_listener(
    old: &Maps,
    new: &mut Maps,
    id: u32,
    info: &interceptor_common::pod::PodInfo,
    port: u16,
    live: &HashSet<u64>,
) -> Result<Registered, Error> {
    let old_cookies: Vec<u64> = [ListenerFamily::V4, ListenerFamily::V6]
        .into_iter()
        .filter_map(|f| old.pod_listener(id, f))
        .collect();
    let had = old_cookies.iter().any(|cookie| live.contains(cookie));
    let Some(path) = locate(info) else {
        // Gone: the agent's first pass collects it.
        return Ok(Registered::No);
    };
    let result = Netns::open(&path)
        .map_err(listeners::Error::from)
        .and_then(|netns| listeners::resolve(new, id, &netns, port).map(drop));
    let Err(err) = result else {
        return Ok(Registered::Yes);
    };
    // Looked at again only now: the pod, or its listener, may have gone since the snapshot.
    let still_there = || {
        locate(info).is_some() && {
            let now = old.listener_cookies();
            old_cookies.iter().any(|cookie| now.contains(cookie))
        }
    };
    match judge(&err, had, still_there) {
        Judgement::HadNone => {
            debug!(pod = %pod_name(info), %err, "inbound listener not resolved (it had none)");
            Ok(Registered::No)
        }
        Judgement::Gone => {
            warn!(pod = %pod_name(info), %err, "inbound pod or its listener went away during the rebuild; skipped");
            Ok(Registered::Skipped)
        }
        Judgement::Fail => Err(Error::Listener {
            pod: pod_name(info),
            source: Box::new(err),
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    /// The pod had no live listener in the old maps.
    HadNone,
    /// The pod (its network namespace) or its old listener is gone: skipped.
    Gone,
    /// It had one and still has: the migration must not go on without it.
    Fail,
}

/// What a failed listener resolution means for the rebuild. A refusal (EPERM/EACCES, e.g. an
/// adopt the kernel denied) fails it whatever else holds; otherwise only if the pod and its
/// old listener are `still_there`.
fn judge(err: &listeners::Error, had: bool, still_there: impl FnOnce() -> bool) -> Judgement {
    if !had {
        Judgement::HadNone
    } else if capabilities::is_denied(err) || still_there() {
        Judgement::Fail
    } else {
        Judgement::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_listener() -> listeners::Error {
        listeners::Error::NoListener {
            port: 15006,
            netns: "/proc/1/ns/net".into(),
        }
    }

    /// A pod that went away (or whose proxy closed its listener) between the snapshot and its
    /// resolution is skipped, not a failed migration.
    #[test]
    fn a_pod_gone_during_the_rebuild_is_skipped() {
        assert_eq!(judge(&no_listener(), true, || false), Judgement::Gone);
        let diag = listeners::Error::Diag {
            netns: "/proc/1/ns/net".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(judge(&diag, true, || false), Judgement::Gone);
    }

    #[test]
    fn a_pod_still_there_or_a_denied_adopt_fails_the_rebuild() {
        assert_eq!(judge(&no_listener(), true, || true), Judgement::Fail);
        let denied = listeners::Error::Adopt {
            port: 15006,
            inode: 7,
            source: std::io::Error::from_raw_os_error(libc::EPERM),
            lacks: String::new(),
        };
        assert_eq!(judge(&denied, true, || false), Judgement::Fail);
        assert_eq!(judge(&no_listener(), false, || true), Judgement::HadNone);
    }
}
