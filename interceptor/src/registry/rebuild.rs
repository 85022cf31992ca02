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
use tracing::{debug, info};

use super::{Error, locate, pod_name};
use crate::{
    bpf::{Maps, maps::ListenerFamily},
    discovery::{listeners, netns::Netns},
};

/// What a rebuild wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub pods: usize,
    /// Inbound pods whose proxy listener was registered in the new maps.
    pub listeners: usize,
}

/// Writes every pod of `old` into `new`, whose registry maps are fresh or the very objects of
/// `old` (kept: the same values are written again). `inbound_port` is the proxy's inbound
/// listener port. Fails if a pod does not fit, or if an inbound pod whose listener was live in
/// `old` cannot have it in `new` (inbound connections to it would then find no proxy after the
/// swap): the caller then abandons the migration and the old datapath runs on.
pub fn rebuild(old: &Maps, new: &mut Maps, inbound_port: u16) -> Result<Rebuilt, Error> {
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
        if inbound && register_listener(old, new, *id, info, inbound_port, &live)? {
            done.listeners += 1;
        }
    }
    info!(
        pods = done.pods,
        listeners = done.listeners,
        "rebuilt the pod registry's maps"
    );
    Ok(done)
}

/// Registers the pod's proxy listener in `new` (`listeners::resolve`). Whether it did; an
/// error only where `old` had a live one.
fn register_listener(
    old: &Maps,
    new: &mut Maps,
    id: u32,
    info: &interceptor_common::pod::PodInfo,
    port: u16,
    live: &HashSet<u64>,
) -> Result<bool, Error> {
    let had = [ListenerFamily::V4, ListenerFamily::V6]
        .into_iter()
        .filter_map(|f| old.pod_listener(id, f))
        .any(|cookie| live.contains(&cookie));
    let netns = locate(info).map(|path| Netns::open(&path));
    let result = match netns {
        Some(Ok(netns)) => listeners::resolve(new, id, &netns, port).map(drop),
        Some(Err(err)) => Err(err.into()),
        // Gone: the agent's first pass collects it.
        None => return Ok(false),
    };
    match result {
        Ok(()) => Ok(true),
        Err(err) if had => Err(Error::Listener {
            pod: pod_name(info),
            source: Box::new(err),
        }),
        Err(err) => {
            debug!(pod = %pod_name(info), %err, "inbound listener not resolved (it had none)");
            Ok(false)
        }
    }
}
