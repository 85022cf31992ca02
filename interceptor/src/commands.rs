//! What each subcommand does, composed from the library's parts; `main.rs` only parses and
//! dispatches here. anyhow lives at this layer (and in main): the parts below have typed errors.

pub mod agent;
pub mod iptables;
pub mod pod;
pub mod proxy;

use anyhow::{Context as _, Result, bail};

use crate::{
    bpf::Pins,
    cli::{Cli, Command},
    status,
};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let pins = Pins::checked(&cli.pin_root)?;
    match cli.command {
        Command::Agent(args) => agent::run(pins, args),
        Command::Proxy(args) => proxy::run(args),
        Command::Pod(cmd) => pod::run(&pins, cmd),
        Command::Status { json } => {
            let status = status::Status::collect(&pins)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Iptables(cmd) => iptables::run(cmd),
        Command::Uninstall { json } => uninstall(&pins, json),
    }
}

/// `interceptor uninstall`: what a DaemonSet's deletion does on each node, by hand.
fn uninstall(pins: &Pins, json: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`interceptor uninstall` detaches programs and removes iptables rules: run it as root"
        );
    }
    let agents = crate::agent::running_agents(pins);
    if !agents.is_empty() {
        bail!(
            "agents are still running on {} (pids {agents:?}): stop them first (in Kubernetes, \
             delete the DaemonSet: its agents uninstall on their way out)",
            pins.root().display()
        );
    }
    let existed = pins.root().exists();
    let iptables_pods = crate::agent::uninstall(pins)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "pin_root": pins.root(),
                "removed": existed,
                "iptables_pods": iptables_pods,
            })
        );
    } else if existed {
        println!(
            "removed the datapath at {} (programs, links, maps; iptables rules of {iptables_pods} \
             iptables-mode pods)",
            pins.root().display()
        );
    } else {
        println!(
            "nothing to remove: no datapath pinned at {}",
            pins.root().display()
        );
    }
    Ok(())
}

/// A multi-threaded runtime for the commands that need one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
