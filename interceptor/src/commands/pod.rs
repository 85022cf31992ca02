//! `interceptor pod enable|disable|list`: the pod registry from the command line.

use anyhow::{Result, bail};

use crate::{
    bpf::{Maps, Pins},
    cli::PodCommand,
    discovery::netns::Netns,
    registry::{self, PodRef, PodSource, Registry},
};

pub fn run(pins: &Pins, cmd: PodCommand) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`interceptor pod` writes the datapath's maps: run it as root");
    }
    let mut maps = Maps::open(pins)?;
    match cmd {
        PodCommand::Enable(args) => {
            crate::capabilities::check(
                "`interceptor pod enable`",
                crate::capabilities::POD_ENABLE,
            )?;
            let mut spec = args.switches.spec()?;
            spec.dns
                .fill_nameservers(&registry::spec::pod_resolv_conf(
                    args.target.netns.as_deref(),
                    args.target.pid,
                ))
                .map_err(anyhow::Error::msg)?;
            let (netns, source) = match (&args.target.netns, args.target.pid) {
                (Some(name), _) => (Netns::by_name(name)?, PodSource::Netns(name.clone())),
                (None, Some(pid)) => (Netns::by_pid(pid)?, PodSource::Pid(pid)),
                (None, None) => bail!("name the pod with --netns or --pid"),
            };
            let entry = Registry::lock(pins, &mut maps)?.enable_with(
                &netns,
                &source,
                &spec,
                args.mode,
                args.backend,
            )?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entry)?);
            } else {
                let addrs: Vec<String> = entry.addresses.iter().map(ToString::to_string).collect();
                println!(
                    "enabled pod {} (id {}, {}, {}): outbound {}, inbound {}",
                    entry.name,
                    entry.id,
                    match entry.backend {
                        Some(b) => format!("iptables mode, {b} backend"),
                        None => "ebpf mode".into(),
                    },
                    if addrs.is_empty() {
                        "no address".into()
                    } else {
                        addrs.join(", ")
                    },
                    if entry.outbound { "on" } else { "off" },
                    match (entry.inbound, entry.inbound_ready) {
                        (false, _) => "off",
                        (true, true) => "on",
                        (true, false) => "on (waiting for the proxy's 15006 listener)",
                    }
                );
            }
        }
        PodCommand::Disable(sel) => {
            let pod = match (sel.netns, sel.pid, sel.id, sel.name) {
                (Some(n), ..) => PodRef::Netns(n),
                (_, Some(p), ..) => PodRef::Pid(p),
                (_, _, Some(i), _) => PodRef::Id(i),
                (_, _, _, Some(n)) => PodRef::Name(n),
                _ => bail!("name the pod with --netns, --pid, --id or --name"),
            };
            let entry = Registry::lock(pins, &mut maps)?.disable(&pod)?;
            println!("disabled pod {} (id {})", entry.name, entry.id);
        }
        PodCommand::List { json } => {
            let pods = registry::list(pins, &maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pods)?);
            } else if pods.is_empty() {
                println!("no pods enabled");
            } else {
                println!(
                    "{:>3}  {:<28} {:<9} {:<34} {:<4} {:<4} IN",
                    "ID", "NAME", "MODE", "ADDRESSES", "OUT", "DNS"
                );
                for p in pods {
                    let addrs: Vec<String> = p.addresses.iter().map(ToString::to_string).collect();
                    println!(
                        "{:>3}  {:<28} {:<9} {:<34} {:<4} {:<4} {}",
                        p.id,
                        p.name,
                        p.mode,
                        addrs.join(","),
                        if p.outbound { "on" } else { "off" },
                        p.spec.dns.label(),
                        match (p.inbound, p.inbound_ready) {
                            (false, _) => "off",
                            (true, true) => "on",
                            (true, false) => "waiting for proxy",
                        }
                    );
                }
            }
        }
    }
    Ok(())
}
