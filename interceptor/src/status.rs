//! `interceptor status`: what is attached, which pods are intercepted, and every counter.

use std::{collections::BTreeMap, fmt::Write as _};

use interceptor_common::{config::CONFIG_APP_NODELAY, names};
use serde::Serialize;

use crate::{
    agent,
    bpf::{Maps, Pins, features::Features, occupancy::MapUse, upgrade::Report},
    registry::{self, PodEntry},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_root: String,
    /// Programs are attached through this pin root.
    pub attached: bool,
    /// Pids of the agents running on this instance.
    pub agents: Vec<u32>,
    pub kernel: String,
    pub features: Features,
    pub programs: Vec<ProgramStatus>,
    pub pods: Vec<PodEntry>,
    pub sockhash_entries: usize,
    /// Every pinned map's entries against its capacity: a full map means a pod that cannot be
    /// enabled or connections that are not redirected.
    pub maps: Vec<MapUse>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Which connections sk_msg carries: `off`, `always` or `adaptive` (`agent
    /// --msg-redirect-policy`), and whether the TCP-memory-pressure brake holds new ones on TCP.
    pub msg_redirect: Option<MsgRedirect>,
    /// Both ends of enabled pods' in-pod hops get TCP_NODELAY when established (`agent
    /// --no-app-nodelay` turns it off). None before an agent wrote the settings.
    pub app_nodelay: Option<bool>,
    /// DNS capture's sendmsg/recvmsg programs are attached: eBPF-mode pods may ask for it.
    pub dns_capture_ebpf: bool,
    /// How the running agent got the datapath (loaded, upgraded in place, adopted) and what of
    /// its settings the datapath does not run.
    pub datapath: Option<Report>,
}

#[derive(Debug, Serialize)]
pub struct MsgRedirect {
    pub policy: &'static str,
    pub memory_pressure_brake: bool,
}

impl MsgRedirect {
    fn of(cfg: &interceptor_common::config::GlobalConfig) -> Self {
        use interceptor_common::config::{
            CONFIG_MSG_ADAPTIVE, CONFIG_MSG_BRAKE, CONFIG_MSG_REDIRECT,
        };
        Self {
            policy: if cfg.flags & CONFIG_MSG_REDIRECT == 0 {
                "off"
            } else if cfg.flags & CONFIG_MSG_ADAPTIVE != 0 {
                "adaptive"
            } else {
                "always"
            },
            memory_pressure_brake: cfg.flags & CONFIG_MSG_BRAKE != 0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// Kernel program id, when loaded.
    pub id: Option<u32>,
    /// Attached at the cgroup root through a pinned link.
    pub linked: bool,
    /// Kernel links to the program (cgroup root, and one per pod netns for sk_lookup).
    pub links: usize,
    /// The program's tag (hash of its code, as bpftool shows it): changes when an upgrade
    /// swapped in different code.
    pub tag: Option<String>,
}

impl Status {
    pub fn collect(pins: &Pins) -> Result<Self, crate::bpf::Error> {
        let features = Features::of_instance(pins);
        let programs = names::prog::ALL
            .iter()
            .map(|&name| {
                let info = program_info(pins, name);
                let id = info.as_ref().map(aya::programs::ProgramInfo::id);
                ProgramStatus {
                    name,
                    id,
                    tag: info.map(|i| format!("{:016x}", i.tag())),
                    linked: pins.link(name).exists(),
                    links: id.map_or(0, crate::bpf::links_of),
                }
            })
            .collect();
        let (pods, sockhash_entries, counters, global) = if pins.map(names::map::POD_INFO).exists()
        {
            let maps = Maps::open(pins)?;
            let pods = registry::list(pins, &maps).unwrap_or_default();
            (
                pods,
                maps.sockhash_entries(),
                maps.counters()?,
                maps.global_config().ok(),
            )
        } else {
            (Vec::new(), 0, BTreeMap::new(), None)
        };
        let msg_redirect = global.as_ref().map(MsgRedirect::of);
        let app_nodelay = global.map(|c| c.flags & CONFIG_APP_NODELAY != 0);
        Ok(Self {
            pin_root: pins.root().display().to_string(),
            attached: pins.is_live(),
            agents: agent::running_agents(pins),
            kernel: features.kernel.clone(),
            features,
            programs,
            pods,
            sockhash_entries,
            maps: crate::bpf::occupancy::occupancy(pins),
            counters,
            msg_redirect,
            app_nodelay,
            dns_capture_ebpf: crate::bpf::attach::dns_capture_available(pins),
            datapath: Report::of_instance(pins),
        })
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "kernel      {}", self.kernel);
        let _ = writeln!(
            out,
            "datapath    {} ({})",
            if self.attached {
                "attached"
            } else {
                "not attached"
            },
            self.pin_root
        );
        let agents = if self.agents.is_empty() {
            "none running".to_string()
        } else {
            self.agents
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "agents      {agents}");
        let _ = writeln!(
            out,
            "inbound     {}",
            if self.features.inbound() {
                "sk_lookup available"
            } else {
                "unavailable (kernel < 5.9): outbound only"
            }
        );
        let _ = writeln!(
            out,
            "dns capture {}",
            if self.dns_capture_ebpf {
                "eBPF (cgroup sendmsg/recvmsg and connect) and iptables"
            } else if self.attached {
                "iptables mode only (no cgroup sendmsg/recvmsg programs attached; Linux >= 5.2)"
            } else {
                "-"
            }
        );
        let _ = writeln!(out, "in use      {}", self.features.in_use.join(", "));
        if let Some(m) = &self.msg_redirect {
            let _ = writeln!(
                out,
                "sk_msg      {}{}",
                m.policy,
                if m.memory_pressure_brake {
                    " — BRAKE ON: TCP memory pressure, new connections stay on TCP"
                } else {
                    ""
                }
            );
        }
        if let Some(on) = self.app_nodelay {
            let _ = writeln!(
                out,
                "app nodelay {}",
                if on {
                    "on: in-pod hops of enabled pods get TCP_NODELAY"
                } else {
                    "off (--no-app-nodelay, Linux < 6.1, or programs without it): in-pod hops keep \
                     the app's Nagle setting"
                }
            );
        }
        if let Some(r) = &self.datapath {
            let from = r
                .migrated_from
                .map_or_else(String::new, |abi| format!(" from ABI {abi}"));
            let _ = writeln!(
                out,
                "started     {}{from} ({} replaced, {} unchanged, {} µs)",
                r.how,
                r.replaced.len(),
                r.unchanged.len(),
                r.micros
            );
            for what in &r.maps {
                let _ = writeln!(out, "  map       {what}");
            }
            for what in &r.not_applied {
                let _ = writeln!(out, "NOT APPLIED {what}");
            }
        }
        let _ = writeln!(out, "\nprograms");
        for p in &self.programs {
            let place = match p.name {
                _ if p.id.is_none() => String::new(),
                _ if p.linked => "attached at the cgroup root".into(),
                names::prog::SK_MSG => "attached to the SOCKS sockhash".into(),
                names::prog::SK_LOOKUP => format!("attached to {} pod namespace(s)", p.links),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<10} {:<16} {place}",
                p.name,
                p.id.map_or_else(|| "-".into(), |id| format!("id {id}")),
                p.tag.as_deref().unwrap_or("-"),
            );
        }
        let _ = writeln!(out, "\npods ({})", self.pods.len());
        for pod in &self.pods {
            let addrs: Vec<String> = pod.addresses.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "  {:>3}  {:<28} {:<8} {:<32} out:{:<3} dns:{:<3} in:{}",
                pod.id,
                pod.name,
                pod.mode,
                addrs.join(","),
                if pod.outbound { "on" } else { "off" },
                pod.spec.dns.label(),
                match (pod.inbound, pod.inbound_ready) {
                    (false, _) => "off",
                    (true, true) => "on (proxy listening)",
                    (true, false) => "on (no proxy listener yet: inbound refused)",
                }
            );
        }
        let _ = writeln!(out, "\nsockhash entries  {}", self.sockhash_entries);
        let keyed: Vec<&MapUse> = self.maps.iter().filter(|m| m.entries.is_some()).collect();
        if !keyed.is_empty() {
            let _ = writeln!(
                out,
                "\nmaps              entries / capacity   kernel memory"
            );
            for m in keyed {
                let _ = writeln!(
                    out,
                    "  {:<15} {:>8} / {:<8} {:>5.1}%  {}",
                    m.name,
                    m.entries.unwrap_or(0),
                    m.capacity,
                    m.percent().unwrap_or(0.0),
                    m.memlock_bytes.map_or_else(
                        || "-".to_owned(),
                        |b| format!("{:.1} KiB", b as f64 / 1024.0)
                    )
                );
            }
        }
        let _ = writeln!(out, "\ncounters");
        for (name, value) in &self.counters {
            if *value > 0 {
                let _ = writeln!(out, "  {name:<32} {value:>10}  {}", meaning(name));
            }
        }
        if self.counters.values().all(|v| *v == 0) {
            let _ = writeln!(out, "  (all zero)");
        }
        out
    }
}

/// A counter's meaning, on one line (its doc comment in `interceptor_common::counters`).
fn meaning(name: &str) -> String {
    interceptor_common::counters::Counter::ALL
        .iter()
        .find(|c| c.name() == name)
        .map(|c| c.meaning().split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn program_info(pins: &Pins, name: &str) -> Option<aya::programs::ProgramInfo> {
    let path = pins.prog(name);
    if !path.exists() {
        return None;
    }
    aya::programs::ProgramInfo::from_pin(&path).ok()
}
