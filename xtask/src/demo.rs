//! `cargo xtask demo`: setup, a release build, and `interceptor-lab demo` (which runs the
//! product binary, `interceptor`, as agent and sidecars).

use anyhow::Result;
use xtask::{exec, step};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Requests the client pod sends.
    #[arg(long, default_value_t = 5)]
    requests: u32,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    crate::setup::run(&crate::setup::Options::default())?;
    let bin = xtask::build_release_lab()?;
    step(&format!("{} demo", bin.display()));
    exec(std::process::Command::new(bin).args(["demo", "--requests", &opts.requests.to_string()]))
}
