//! What each subcommand does, composed from the library's parts; `main.rs` only parses and
//! dispatches here. anyhow lives at this layer (and in main): the parts below have typed errors.

pub mod agent;
pub mod iptables;
pub mod pod;
pub mod proxy;

use anyhow::{Context as _, Result};

use crate::{
    bpf::Pins,
    cli::{Cli, Command},
    status,
};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let pins = Pins::new(&cli.pin_root);
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
    }
}

/// A multi-threaded runtime for the commands that need one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
