//! Pods intercepted by istio-iptables' rules instead of the datapath. Their rules live in the
//! pod's network namespace, their registry entry in `POD_INFO` (mode iptables, so ids, names,
//! `pod list` and the collection of gone pods work as for the others), and what was applied in
//! a record under the instance's run directory (bpffs holds no regular files). They have no
//! `POD_CONFIG`/`POD_IPS` entry: connect4, sk_lookup and getsockopt leave them to netfilter.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use interceptor_common::{
    config::PASSTHROUGH_V6,
    pod::{MODE_EBPF, MODE_IPTABLES, PodInfo},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    Error, PodEntry, PodSource, Registry, backend_code, backend_of, display_name, locate, pod_info,
    pod_name, source_name,
};
use crate::{
    bpf::Pins,
    discovery::netns::{self, Netns},
    iptables::{self, Backend, BackendChoice, Settings},
    registry::spec::PodSpec,
};

/// What was applied to an iptables-mode pod.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    spec: PodSpec,
    backend: Backend,
    addresses: Vec<IpAddr>,
}

fn record_path(pins: &Pins, id: u32) -> PathBuf {
    pins.run_dir().join("iptables").join(format!("{id}.json"))
}

/// Drops the record of pod `id`, if it has one.
pub(super) fn forget(pins: &Pins, id: u32) {
    let _ = fs::remove_file(record_path(pins, id));
}

fn save(pins: &Pins, id: u32, record: &Record) -> Result<(), Error> {
    let path = record_path(pins, id);
    let io = |source| Error::Io {
        what: "writing",
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let json = serde_json::to_vec_pretty(record)
        .map_err(std::io::Error::other)
        .map_err(io)?;
    fs::write(&path, json).map_err(io)
}

/// The `pod list` entry of an iptables-mode pod.
pub(super) fn entry(pins: &Pins, id: u32, info: &PodInfo) -> Result<PodEntry, Error> {
    let path = record_path(pins, id);
    let record: Record = fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|reason| Error::Record {
            pod: pod_name(info),
            path,
            reason,
        })?;
    let inbound = record.spec.inbound();
    Ok(PodEntry {
        id,
        name: pod_name(info),
        source: source_name(info),
        mode: "iptables",
        backend: Some(record.backend),
        netns_cookie: info.netns_cookie,
        addresses: record.addresses,
        outbound: record.spec.outbound,
        inbound,
        inbound_listener: None,
        // REDIRECT needs no registration: a proxy listening on 15006 gets the connections.
        inbound_ready: inbound,
        spec: record.spec,
    })
}

impl Registry<'_> {
    pub(super) fn enable_iptables(
        &mut self,
        netns: &Netns,
        source: &PodSource,
        spec: &PodSpec,
        choice: BackendChoice,
    ) -> Result<PodEntry, Error> {
        let name = display_name(source);
        if name.len() > interceptor_common::pod::POD_NAME_LEN {
            return Err(Error::NameTooLong(name));
        }
        if netns.is_node() {
            return Err(Error::NodeNetns(netns.path().to_owned()));
        }
        let id = match self.find_by_netns(netns)? {
            // Leaving the datapath: its entries go first.
            Some((id, info)) if info.mode == MODE_EBPF => {
                self.remove(id, info.netns_cookie)?;
                id
            }
            // New settings: the old rules go, the new ones are applied whole.
            Some((id, info)) => {
                self.disable_iptables(id, &info, Some(netns))?;
                id
            }
            None => self.free_id()?,
        };
        let iptables_err = |source| Error::Iptables {
            pod: name.clone(),
            source,
        };
        let addresses = netns
            .run(netns::pod_addresses)?
            .map_err(|source| Error::Io {
                what: "listing addresses in",
                path: netns.path().to_owned(),
                source,
            })?;
        let backend = iptables::resolve(netns, choice);
        let settings = self.iptables_settings()?;
        super::ensure_passthrough_v6(netns, IpAddr::V6(settings.passthrough_v6), &addresses);
        iptables::apply(netns, spec, &settings, backend).map_err(iptables_err)?;

        let record = Record {
            spec: spec.clone(),
            backend,
            addresses,
        };
        // The cookie (where the kernel tells it) keeps a reused inode number from passing for
        // this pod once it is gone.
        let info = pod_info(
            netns.cookie().unwrap_or(0),
            netns,
            source,
            &name,
            MODE_IPTABLES,
            backend_code(backend),
        );
        let stored = save(self.pins, id, &record).and_then(|()| {
            self.maps
                .put_pod_info(id, info)
                .map_err(|e| Error::MapWrite {
                    map: e.map,
                    pod: name.clone(),
                    source: e.source,
                })
        });
        if let Err(err) = stored {
            // Never leave rules nobody knows about.
            warn!(pod = %name, %err, "recording the pod failed; removing its rules");
            let _ = iptables::remove(netns, backend);
            forget(self.pins, id);
            return Err(err);
        }
        info!(pod = %name, id, %backend, "pod enabled (iptables mode)");
        self.entry(id)
    }

    /// Removes an iptables-mode pod: its rules (when its namespace still exists), then its
    /// record and registry entry.
    pub(super) fn disable_iptables(
        &mut self,
        id: u32,
        info: &PodInfo,
        netns: Option<&Netns>,
    ) -> Result<(), Error> {
        if let Some(ns) = netns {
            iptables::remove(ns, backend_of(info.backend)).map_err(|source| Error::Iptables {
                pod: pod_name(info),
                source,
            })?;
        }
        forget(self.pins, id);
        self.maps.remove_pod_info(id);
        Ok(())
    }

    /// Removes the rules of every iptables-mode pod (the datapath is being torn down: nothing
    /// the agent set up may stay behind).
    pub fn remove_all_iptables(&mut self) -> Result<usize, Error> {
        let pods: Vec<(u32, PodInfo)> = self
            .infos()
            .into_iter()
            .filter(|(_, i)| i.mode == MODE_IPTABLES)
            .collect();
        for (id, info) in &pods {
            let netns = locate(info).and_then(|p| Netns::open(p).ok());
            self.disable_iptables(*id, info, netns.as_ref())?;
        }
        Ok(pods.len())
    }

    fn iptables_settings(&self) -> Result<Settings, Error> {
        let cfg = self.maps.global_config()?;
        let v6 = match interceptor_common::addr::to_ip(cfg.passthrough_ip6) {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => Ipv6Addr::from(PASSTHROUGH_V6),
        };
        Ok(Settings {
            outbound_port: cfg.outbound_port as u16,
            inbound_port: cfg.inbound_port as u16,
            passthrough_v4: Ipv4Addr::from(u32::from_be(cfg.passthrough_ip4)),
            passthrough_v6: v6,
        })
    }
}
