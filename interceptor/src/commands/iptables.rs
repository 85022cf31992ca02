//! `interceptor iptables apply|remove`: istio-iptables' job, without the agent.

use anyhow::{Result, bail};

use crate::{
    cli::{IptablesCommand, NetnsTarget},
    discovery::netns::Netns,
    iptables,
};

fn netns_of(target: &NetnsTarget) -> Result<Netns> {
    Ok(match (&target.netns, target.pid) {
        (Some(name), _) => Netns::by_name(name)?,
        (None, Some(pid)) => Netns::by_pid(pid)?,
        (None, None) => bail!("name the network namespace with --netns or --pid"),
    })
}

pub fn run(cmd: IptablesCommand) -> Result<()> {
    match cmd {
        IptablesCommand::Apply(args) => {
            let mut spec = args.switches.spec()?;
            spec.dns
                .fill_nameservers(&crate::registry::spec::pod_resolv_conf(
                    args.target.netns.as_deref(),
                    args.target.pid,
                ))
                .map_err(anyhow::Error::msg)?;
            let settings = iptables::Settings {
                outbound_port: args.outbound_port,
                inbound_port: args.inbound_port,
                ..iptables::Settings::default()
            };
            if args.dry_run {
                for family in [iptables::Family::V4, iptables::Family::V6] {
                    print!(
                        "{}",
                        iptables::RuleSet::new(&spec, &settings, family).save_format()
                    );
                }
                return Ok(());
            }
            if !nix::unistd::geteuid().is_root() {
                bail!("writing iptables rules into a network namespace needs root");
            }
            let netns = netns_of(&args.target)?;
            let backend = iptables::resolve(&netns, args.backend);
            let applied = iptables::apply(&netns, &spec, &settings, backend)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&applied)?);
            } else {
                println!(
                    "applied {} rules in {} ({} backend, {})",
                    applied.rules,
                    netns.path().display(),
                    applied.backend,
                    applied
                        .families
                        .iter()
                        .map(|f| match f {
                            iptables::Family::V4 => "iptables",
                            iptables::Family::V6 => "ip6tables",
                        })
                        .collect::<Vec<_>>()
                        .join(" + ")
                );
            }
        }
        IptablesCommand::Remove(args) => {
            if !nix::unistd::geteuid().is_root() {
                bail!("removing iptables rules from a network namespace needs root");
            }
            let netns = netns_of(&args.target)?;
            let backend = iptables::resolve(&netns, args.backend);
            let removed = iptables::remove(&netns, backend)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "backend": backend, "removed": removed })
                );
            } else if removed == 0 {
                println!(
                    "no Istio chains in {} ({backend} backend)",
                    netns.path().display()
                );
            } else {
                println!(
                    "removed {removed} rules from {} ({backend} backend)",
                    netns.path().display()
                );
            }
        }
    }
    Ok(())
}
